//! OAuth2 client-credentials tokens sealgate fetches for a data source
//! (SPEC section 11), so the app never holds the client secret. The token
//! request takes the data traffic's path: the egress policy on the token
//! host, one resolution judged by the deny list, the region's egress
//! address, TLS verified with the data source's CA settings. A token is
//! reused until a quarter of its life (at most 60 s) is left, then
//! refreshed in the background, one fetch at a time; requests that find no
//! valid token wait for the one fetch. A failed fetch leaves the last
//! token in use until it expires. The token endpoint's body is never
//! logged or passed on (it can echo the secret): its status and OAuth
//! `error` code are.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::HeaderValue;
use http_body_util::BodyExt;
use zeroize::Zeroizing;

use crate::audit::Event;
use crate::config::{Config, DataSource};
use crate::connect::{self, failure, LoginFailure};
use crate::echoes::Echoes;
use crate::errors::{ErrorCode, Refusal};
use crate::secrets::Secret;
use crate::state::Shared;
use crate::upstream::Upstream;

/// A token response larger than this is refused unread.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Refresh-ahead never starts earlier than this before expiry.
const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// An `expires_in` over a year is taken for a mistake, not a lifetime.
const MAX_EXPIRES_IN: u64 = 365 * 24 * 3600;
/// After a failed fetch, requests are answered with its failure for this
/// long instead of fetching again: a token endpoint that is down is asked
/// once a second, not once per request.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// What a token without `expires_in` is assumed to live (RFC 6749 makes
/// it optional; an hour is the common default).
const DEFAULT_EXPIRES_IN: u64 = 3600;

/// How the client authenticates to the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// A token in use: the `Authorization` value made once, and the forms it
/// could come back in, for redaction.
pub struct Token {
    pub header: HeaderValue,
    pub echoes: Echoes,
    expires: Instant,
    refresh_at: Instant,
    pub expires_wall: SystemTime,
    generation: u64,
}

/// What `/v1/datasources` shows of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    /// No token fetched yet.
    None,
    Fresh,
    Refreshing,
    Failed,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::None => "none",
            TokenStatus::Fresh => "fresh",
            TokenStatus::Refreshing => "refreshing",
            TokenStatus::Failed => "failed",
        }
    }
}

struct State {
    token: Option<Arc<Token>>,
    /// The last failed fetch: when it ended and why, so that requests
    /// waiting behind it take its answer instead of fetching again.
    failed: Option<(Instant, String)>,
}

pub struct OAuth2 {
    pub token_url: String,
    pub client_id: String,
    pub client_auth: ClientAuth,
    target: Upstream,
    /// The token URL's path and query.
    path: String,
    form: Zeroizing<Vec<u8>>,
    basic: Option<HeaderValue>,
    tls: Option<Arc<rustls::ClientConfig>>,
    state: Mutex<State>,
    fetching: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    generation: AtomicU64,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// `application/x-www-form-urlencoded` (RFC 6749 appendix B).
fn form_encode(out: &mut Vec<u8>, value: &[u8]) {
    for &b in value {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
        }
    }
}

fn form_pair(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    if !out.is_empty() {
        out.push(b'&');
    }
    form_encode(out, name.as_bytes());
    out.push(b'=');
    form_encode(out, value);
}

impl OAuth2 {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        token_url: &str,
        client_id: &str,
        secret: &Secret,
        client_auth: ClientAuth,
        scopes: &[String],
        params: &[(String, String)],
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<OAuth2, String> {
        let url = url::Url::parse(token_url).map_err(|e| format!("token_url: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err("token_url must be an https:// URL".into());
        }
        let target = Upstream::from_url(&url).map_err(|e| format!("token_url: {e}"))?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        if client_id.is_empty() || client_id.chars().any(char::is_control) {
            return Err("client_id must be non-empty text".into());
        }
        // Sized up front so the secret is never left behind in a buffer
        // that grew.
        let mut form = Zeroizing::new(Vec::with_capacity(
            256 + 3 * (client_id.len() + secret.expose().len())
                + scopes.iter().map(|s| 3 * s.len() + 1).sum::<usize>()
                + params
                    .iter()
                    .map(|(k, v)| 3 * (k.len() + v.len()) + 2)
                    .sum::<usize>(),
        ));
        form_pair(&mut form, "grant_type", b"client_credentials");
        if !scopes.is_empty() {
            form_pair(&mut form, "scope", scopes.join(" ").as_bytes());
        }
        for (name, value) in params {
            form_pair(&mut form, name, value.as_bytes());
        }
        let basic = match client_auth {
            ClientAuth::Post => {
                form_pair(&mut form, "client_id", client_id.as_bytes());
                form_pair(&mut form, "client_secret", secret.expose().as_bytes());
                None
            }
            ClientAuth::Basic => {
                let mut pair = Zeroizing::new(Vec::with_capacity(
                    3 * (client_id.len() + secret.expose().len()) + 1,
                ));
                form_encode(&mut pair, client_id.as_bytes());
                pair.push(b':');
                form_encode(&mut pair, secret.expose().as_bytes());
                let encoded = Zeroizing::new(STANDARD.encode(&*pair));
                let mut value = Zeroizing::new(Vec::with_capacity(6 + encoded.len()));
                value.extend_from_slice(b"Basic ");
                value.extend_from_slice(encoded.as_bytes());
                let mut header = HeaderValue::from_maybe_shared(Bytes::from_owner(value))
                    .map_err(|_| "the client secret cannot be sent in a header".to_string())?;
                header.set_sensitive(true);
                Some(header)
            }
        };
        Ok(OAuth2 {
            token_url: token_url.to_string(),
            client_id: client_id.to_string(),
            client_auth,
            tls: if target.tls { tls } else { None },
            target,
            path,
            form,
            basic,
            state: Mutex::new(State {
                token: None,
                failed: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        })
    }

    /// The token host, for the egress policy.
    pub fn target(&self) -> &Upstream {
        &self.target
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token in use while it is valid: the path every request takes
    /// between fetches (one uncontended lock and a reference count).
    pub fn cached(&self) -> Option<Arc<Token>> {
        self.state()
            .token
            .clone()
            .filter(|t| Instant::now() < t.expires)
    }

    pub fn status(&self) -> (TokenStatus, Option<SystemTime>) {
        let state = self.state();
        let expiry = state.token.as_ref().map(|t| t.expires_wall);
        let status = if self.refreshing.load(Ordering::Relaxed) {
            TokenStatus::Refreshing
        } else if state.failed.is_some() {
            TokenStatus::Failed
        } else if state.token.is_some() {
            TokenStatus::Fresh
        } else {
            TokenStatus::None
        };
        (status, expiry)
    }

    /// A valid token for a request: the current one (starting a refresh in
    /// the background when its time has come), else the one fetch every
    /// waiting request shares, within `connect_timeout_ms` + `timeout_ms`.
    pub async fn token(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        config: &Arc<Config>,
        ds: &Arc<DataSource>,
    ) -> Result<Arc<Token>, Refusal> {
        if let Some(token) = self.cached() {
            if Instant::now() >= token.refresh_at {
                self.refresh_in_background(shared, config, ds, token.generation);
            }
            return Ok(token);
        }
        let waited_from = Instant::now();
        let fetched = tokio::time::timeout(ds.connect_timeout + ds.timeout, async {
            let _one_fetch = self.fetching.lock().await;
            if let Some(token) = self.cached() {
                return Ok(token);
            }
            let failed_meanwhile = self
                .state()
                .failed
                .clone()
                .filter(|(at, _)| *at >= waited_from || at.elapsed() < RETRY_AFTER_FAILURE);
            match failed_meanwhile {
                Some((_, why)) => Err(why),
                None => self.fetch(shared, config, ds).await,
            }
        })
        .await;
        let why = match fetched {
            Ok(Ok(token)) => return Ok(token),
            Ok(Err(why)) => why,
            Err(_) => "the token endpoint did not answer in time".to_string(),
        };
        Err(Refusal::new(
            ErrorCode::CredentialUnavailable,
            format!(
                "data source \"{}\" has no valid access token: {why}; nothing was sent",
                ds.name
            ),
        ))
    }

    /// The data source refused the token this request carried (401): one
    /// early refresh, unless a newer token is already in use.
    pub fn rejected(
        self: &Arc<Self>,
        used: &Token,
        shared: &Arc<Shared>,
        config: &Arc<Config>,
        ds: &Arc<DataSource>,
    ) {
        self.refresh_in_background(shared, config, ds, used.generation);
    }

    /// One background fetch at a time, and only while the token it would
    /// replace (`generation`) is still the one in use.
    fn refresh_in_background(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        config: &Arc<Config>,
        ds: &Arc<DataSource>,
        generation: u64,
    ) {
        let failed_lately = self
            .state()
            .failed
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < RETRY_AFTER_FAILURE);
        if failed_lately
            || self.generation.load(Ordering::Acquire) != generation
            || self.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (this, shared, config, ds) = (self.clone(), shared.clone(), config.clone(), ds.clone());
        tokio::spawn(async move {
            let deadline = ds.connect_timeout + ds.timeout;
            let _ = tokio::time::timeout(deadline, async {
                let _one_fetch = this.fetching.lock().await;
                if this.generation.load(Ordering::Acquire) == generation {
                    let _ = this.fetch(&shared, &config, &ds).await;
                }
            })
            .await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// Fetches a token (the caller holds `fetching`), and records the
    /// outcome: metrics, an audit event, the state.
    async fn fetch(
        &self,
        shared: &Shared,
        config: &Config,
        ds: &DataSource,
    ) -> Result<Arc<Token>, String> {
        let outcome = self.request(shared, config, ds).await;
        let metrics = &shared.metrics;
        let result = match &outcome {
            Ok(_) => "ok",
            Err((kind, _)) => kind,
        };
        metrics
            .credential_refreshes
            .with_label_values(&[ds.name.as_str(), result])
            .inc();
        match outcome {
            Ok((access_token, expires_in)) => {
                let lifetime = Duration::from_secs(expires_in);
                let ahead = (lifetime / 4).min(MAX_REFRESH_AHEAD);
                let now = Instant::now();
                let mut value = Zeroizing::new(Vec::with_capacity(7 + access_token.len()));
                value.extend_from_slice(b"Bearer ");
                value.extend_from_slice(access_token.as_bytes());
                let echoes = Echoes::with_body_scrubber(&[access_token.as_bytes(), &value]);
                let mut header =
                    HeaderValue::from_maybe_shared(Bytes::from_owner(value)).map_err(|_| {
                        "the token endpoint sent a token that cannot be sent in a header"
                            .to_string()
                    })?;
                header.set_sensitive(true);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                let expires_wall = SystemTime::now() + lifetime;
                let token = Arc::new(Token {
                    header,
                    echoes,
                    expires: now + lifetime,
                    refresh_at: now + lifetime - ahead,
                    expires_wall,
                    generation,
                });
                {
                    let mut state = self.state();
                    state.token = Some(token.clone());
                    state.failed = None;
                }
                let at = expires_wall
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                metrics
                    .credential_expiry
                    .with_label_values(&[ds.name.as_str()])
                    .set(at);
                shared.audit.event(
                    Event::CredentialRefresh,
                    "ok",
                    &format!(
                        "data source \"{}\": a new access token, valid until {} ({expires_in} s)",
                        ds.name,
                        crate::audit::rfc3339(expires_wall)
                    ),
                    None,
                );
                Ok(token)
            }
            Err((kind, why)) => {
                tracing::warn!(datasource = %ds.name, result = kind, reason = %why, "fetching an OAuth2 access token failed");
                self.state().failed = Some((Instant::now(), why.clone()));
                shared.audit.event(
                    Event::CredentialRefresh,
                    kind,
                    &format!("data source \"{}\": {why}", ds.name),
                    None,
                );
                Err(why)
            }
        }
    }

    /// The token request. Failures are (metric result, reason); a reason
    /// names the status and the OAuth `error` code, never the body.
    async fn request(
        &self,
        shared: &Shared,
        config: &Config,
        ds: &DataSource,
    ) -> Result<(Zeroizing<String>, u64), (&'static str, String)> {
        let denied = |why: String| ("egress_denied", why);
        config
            .egress
            .destination(&self.target.host, self.target.port)
            .map_err(|d| denied(format!("the token host is not allowed: {}", d.reason)))?;
        let (status, body) = async {
            let (io, _) =
                connect::open(shared, config, ds, &self.target, self.tls.as_ref()).await?;
            tokio::time::timeout(ds.timeout, self.post(io))
                .await
                .unwrap_or_else(|_| {
                    Err(failure(
                        ErrorCode::UpstreamTimeout,
                        "timeout",
                        format!(
                            "the token request did not finish within {} ms (timeout_ms)",
                            ds.timeout.as_millis()
                        ),
                    ))
                })
        }
        .await
        .map_err(|f: LoginFailure| {
            let kind = if f.refusal.code == ErrorCode::EgressDenied {
                "egress_denied"
            } else {
                "unreachable"
            };
            (kind, f.refusal.message)
        })?;
        if !(200..300).contains(&status) {
            let code = oauth_error_code(&body);
            let kind = if status == 401 || status == 400 || status == 403 {
                "refused"
            } else {
                "http_error"
            };
            return Err((
                kind,
                match code {
                    Some(code) => format!("the token endpoint answered {status} ({code})"),
                    None => format!("the token endpoint answered {status}"),
                },
            ));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: Option<String>,
            expires_in: Option<serde_json::Value>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            (
                "invalid",
                "the token endpoint's answer is not JSON".to_string(),
            )
        })?;
        let Some(access_token) = parsed.access_token.filter(|t| !t.is_empty()) else {
            return Err((
                "invalid",
                "the token endpoint's answer has no access_token".into(),
            ));
        };
        let access_token = Zeroizing::new(access_token);
        let expires_in = match parsed.expires_in {
            None => DEFAULT_EXPIRES_IN,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .filter(|s| (1..=MAX_EXPIRES_IN).contains(s))
                .ok_or_else(|| ("invalid", "the token endpoint's expires_in is not a number of seconds from 1 to a year".to_string()))?,
        };
        Ok((access_token, expires_in))
    }

    /// POSTs the form over `io` and reads the answer (bounded).
    async fn post<T>(&self, io: T) -> Result<(u16, Zeroizing<Vec<u8>>), LoginFailure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let broken = |what: &str| failure(ErrorCode::UpstreamUnreachable, "protocol", what);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(|_| broken("the token endpoint's connection failed"))?;
        tokio::spawn(connection);
        let mut request = http::Request::post(self.path.as_str())
            .header(http::header::HOST, self.target.authority.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some(basic) = &self.basic {
            request = request.header(http::header::AUTHORIZATION, basic.clone());
        }
        let form = Bytes::from_owner(Zeroizing::new(self.form.to_vec()));
        let request = request
            .body(http_body_util::Full::new(form))
            .map_err(|_| broken("the token request could not be made"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| broken("the token endpoint closed the connection"))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|_| broken("the token endpoint's answer is too long or broken"))?
            .to_bytes();
        Ok((status, Zeroizing::new(body.to_vec())))
    }
}

/// The OAuth `error` code of an error answer (RFC 6749 5.2), if it is one:
/// a short word, never free text.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorResponse {
        error: String,
    }
    let code = serde_json::from_slice::<ErrorResponse>(body).ok()?.error;
    (code.len() <= 64 && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_is_encoded_as_rfc_6749_says() {
        let mut out = Vec::new();
        form_pair(&mut out, "scope", b"crm.read a+b/c");
        form_pair(&mut out, "client_secret", "s3cr:t%é".as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "scope=crm.read+a%2Bb%2Fc&client_secret=s3cr%3At%25%C3%A9"
        );
    }

    #[test]
    fn only_a_short_oauth_error_code_is_read_from_an_error_body() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_client","error_description":"secret xyz"}"#),
            Some("invalid_client".into())
        );
        assert_eq!(oauth_error_code(br#"{"error":"the secret is xyz"}"#), None);
        assert_eq!(oauth_error_code(b"<html>"), None);
    }
}
