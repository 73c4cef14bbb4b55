//! Credentials injected at the edge. Each is opened once at load; per
//! request, injecting it is a reference-count bump (the header value shares
//! zeroizing memory) and redacting responses is a substring scan for the
//! forms made at load (`echoes`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use pingora::http::{RequestHeader, ResponseHeader};
use zeroize::Zeroizing;

use std::sync::Arc;

use crate::echoes::Echoes;
use crate::oauth2::OAuth2;
use crate::secrets::Secret;
use crate::sigv4::Sigv4;

/// RFC 3986 unreserved characters stay as they are; everything else in a
/// query name or value is percent-encoded.
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Headers a credential may not set: they frame or route the request, or
/// belong to one hop.
const FORBIDDEN_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Bearer,
    Basic,
    Header,
    Query,
    /// A database login: user name and password.
    Password,
    /// An OAuth2 access token sealgate fetches with a client secret.
    Oauth2,
    /// AWS Signature Version 4 over every request.
    AwsSigv4,
}

impl CredentialKind {
    pub fn parse(kind: &str) -> Option<CredentialKind> {
        match kind {
            "bearer" => Some(CredentialKind::Bearer),
            "basic" => Some(CredentialKind::Basic),
            "header" => Some(CredentialKind::Header),
            "query" => Some(CredentialKind::Query),
            "password" => Some(CredentialKind::Password),
            "oauth2" => Some(CredentialKind::Oauth2),
            "aws_sigv4" => Some(CredentialKind::AwsSigv4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Bearer => "bearer",
            CredentialKind::Basic => "basic",
            CredentialKind::Header => "header",
            CredentialKind::Query => "query",
            CredentialKind::Password => "password",
            CredentialKind::Oauth2 => "oauth2",
            CredentialKind::AwsSigv4 => "aws_sigv4",
        }
    }

    /// The one secret field of this kind (SPEC section 2).
    pub fn secret_field(self) -> &'static str {
        match self {
            CredentialKind::Bearer => "token",
            CredentialKind::Basic | CredentialKind::Password => "password",
            CredentialKind::Header | CredentialKind::Query => "value",
            CredentialKind::Oauth2 => "client_secret",
            CredentialKind::AwsSigv4 => "secret_access_key",
        }
    }
}

enum Injection {
    Header {
        /// The name as it goes on the wire, made once: pingora turns it into
        /// its case-preserving form by sharing these bytes, where a
        /// `HeaderName` would be copied into a new allocation per request.
        name: Bytes,
        value: HeaderValue,
    },
    /// `name=value`, percent-encoded, appended to the query.
    Query { name: String, pair: Bytes },
    /// Not injected into anything: a database front logs in with it.
    Login(Secret),
    /// A token fetched per data source; the request waits for one.
    Minted(Arc<OAuth2>),
    /// A signature made per request.
    Signed(Box<Sigv4>),
}

/// An opened credential, ready to inject.
pub struct Credential {
    pub kind: CredentialKind,
    /// Non-secret parts, for admin output: the basic username, the header
    /// or query parameter name.
    pub username: Option<String>,
    pub name: Option<String>,
    injection: Injection,
    /// Every form in which the secret could come back in a response head
    /// or body; boxed, as it is most of a credential's size.
    echoes: Box<Echoes>,
    /// When the credential stops working (`expires_at`, Unix seconds).
    pub expires_at: Option<u64>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339 in UTC, as `expires_at` takes it)
/// as Unix seconds.
pub fn parse_utc(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<u64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || h > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + sec)
}

/// Bytes that live in zeroizing memory: dropping the last clone wipes them.
fn zeroizing_bytes(bytes: Vec<u8>) -> Bytes {
    Bytes::from_owner(Zeroizing::new(bytes))
}

/// The parts joined in a buffer sized up front: `format!` may grow its
/// buffer as it goes and leave unwiped pieces of the secret behind.
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

fn sensitive_header_value(bytes: Vec<u8>) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_maybe_shared(zeroizing_bytes(bytes))
        .map_err(|_| "the secret cannot be sent in a header".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

impl Credential {
    pub fn bearer(token: &Secret) -> Result<Credential, String> {
        let value = sensitive_header_value(joined(&[b"Bearer ", token.expose().as_bytes()]))?;
        let echoes = Echoes::with_body_scrubber(&[token.expose().as_bytes(), value.as_bytes()]);
        Ok(Credential {
            kind: CredentialKind::Bearer,
            username: None,
            name: None,
            injection: Injection::Header {
                name: Bytes::from_static(b"Authorization"),
                value,
            },
            echoes: Box::new(echoes),
            expires_at: None,
        })
    }

    pub fn basic(username: &str, password: &Secret) -> Result<Credential, String> {
        if username.contains(':') || username.chars().any(char::is_control) {
            return Err("the username may not contain ':' or control characters".into());
        }
        let pair = Zeroizing::new(joined(&[
            username.as_bytes(),
            b":",
            password.expose().as_bytes(),
        ]));
        let encoded = Zeroizing::new(STANDARD.encode(&*pair));
        let value = sensitive_header_value(joined(&[b"Basic ", encoded.as_bytes()]))?;
        let echoes = Echoes::with_body_scrubber(&[
            password.expose().as_bytes(),
            &pair,
            encoded.as_bytes(),
            value.as_bytes(),
        ]);
        Ok(Credential {
            kind: CredentialKind::Basic,
            username: Some(username.to_string()),
            name: None,
            injection: Injection::Header {
                name: Bytes::from_static(b"Authorization"),
                value,
            },
            echoes: Box::new(echoes),
            expires_at: None,
        })
    }

    pub fn header(name: &str, value: &Secret) -> Result<Credential, String> {
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        if FORBIDDEN_HEADERS.contains(&header_name.as_str()) {
            return Err(format!("a credential may not set `{name}`"));
        }
        Ok(Credential {
            kind: CredentialKind::Header,
            username: None,
            name: Some(header_name.as_str().to_string()),
            injection: Injection::Header {
                name: Bytes::copy_from_slice(header_name.as_str().as_bytes()),
                value: sensitive_header_value(value.expose().as_bytes().to_vec())?,
            },
            echoes: Box::new(Echoes::with_body_scrubber(&[value.expose().as_bytes()])),
            expires_at: None,
        })
    }

    pub fn query(name: &str, value: &Secret) -> Result<Credential, String> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err("the query parameter name must be non-empty text".into());
        }
        // At most three bytes per byte: sized so it never reallocates.
        let mut encoded_value = Zeroizing::new(String::with_capacity(value.expose().len() * 3));
        encoded_value.extend(utf8_percent_encode(value.expose(), QUERY_COMPONENT));
        let encoded_name = utf8_percent_encode(name, QUERY_COMPONENT).to_string();
        let pair = joined(&[encoded_name.as_bytes(), b"=", encoded_value.as_bytes()]);
        let echoes = Echoes::with_body_scrubber(&[value.expose().as_bytes(), &pair]);
        Ok(Credential {
            kind: CredentialKind::Query,
            username: None,
            name: Some(name.to_string()),
            injection: Injection::Query {
                name: name.to_string(),
                pair: zeroizing_bytes(pair),
            },
            echoes: Box::new(echoes),
            expires_at: None,
        })
    }

    /// A database login; the user name is `username`.
    pub fn password(username: &str, password: Secret) -> Result<Credential, String> {
        if username.is_empty() || username.chars().any(char::is_control) {
            return Err("the username must be non-empty, without control characters".into());
        }
        Ok(Credential {
            kind: CredentialKind::Password,
            username: Some(username.to_string()),
            name: None,
            echoes: Box::new(Echoes::of(&[password.expose().as_bytes()])),
            injection: Injection::Login(password),
            expires_at: None,
        })
    }

    /// An OAuth2 credential: the access token is fetched by sealgate.
    pub fn oauth2(client: OAuth2, secret: &Secret) -> Credential {
        Credential {
            kind: CredentialKind::Oauth2,
            username: Some(client.client_id.clone()),
            name: None,
            echoes: Box::new(Echoes::with_body_scrubber(&[secret.expose().as_bytes()])),
            injection: Injection::Minted(Arc::new(client)),
            expires_at: None,
        }
    }

    /// AWS Signature Version 4: the keys are sealgate's, the signature
    /// is made per request.
    pub fn sigv4(signer: Sigv4, secrets: &[&Secret]) -> Credential {
        let forms: Vec<&[u8]> = secrets.iter().map(|s| s.expose().as_bytes()).collect();
        Credential {
            kind: CredentialKind::AwsSigv4,
            username: None,
            name: Some(format!("{}/{}", signer.region, signer.service)),
            echoes: Box::new(Echoes::with_body_scrubber(&forms)),
            injection: Injection::Signed(Box::new(signer)),
            expires_at: None,
        }
    }

    /// The signer of a credential that signs each request.
    pub fn signer(&self) -> Option<&Sigv4> {
        match &self.injection {
            Injection::Signed(signer) => Some(signer),
            _ => None,
        }
    }

    /// The token source of a credential sealgate mints.
    pub fn minted(&self) -> Option<&Arc<OAuth2>> {
        match &self.injection {
            Injection::Minted(client) => Some(client),
            _ => None,
        }
    }

    /// The user name and password of a database login credential.
    pub fn login(&self) -> Option<(&str, &Secret)> {
        match (&self.injection, &self.username) {
            (Injection::Login(password), Some(user)) => Some((user, password)),
            _ => None,
        }
    }

    /// Removes whatever the caller sent in the credential's place, then sets
    /// the credential: a caller can neither override nor add to it.
    pub fn inject_header(&self, req: &mut RequestHeader) -> pingora::Result<()> {
        if let Injection::Header { name, value } = &self.injection {
            // Inserting replaces every value the caller sent under the name.
            req.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    /// For a credential that travels in the query string, the query to
    /// send upstream: the caller's, without any parameter of the
    /// credential's name, plus the credential. It holds the secret, so it
    /// is zeroised when dropped (and sized up front so it never moves).
    /// `None` for credentials that travel in a header.
    pub fn query_with_credential(&self, caller_query: Option<&str>) -> Option<Zeroizing<String>> {
        let Injection::Query { name, pair } = &self.injection else {
            return None;
        };
        let mut query = Zeroizing::new(String::with_capacity(
            caller_query.map_or(0, str::len) + pair.len() + 1,
        ));
        for part in caller_query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let raw_name = part.split('=').next().unwrap_or("");
            let decoded = percent_decode_str(&raw_name.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            if decoded != *name {
                query.push_str(part);
                query.push('&');
            }
        }
        query.push_str(std::str::from_utf8(pair).unwrap_or(""));
        Some(query)
    }

    /// Redacts every part of a response head that carries the secret
    /// (`Echoes::redact_head`); returns how many did.
    pub fn redact(&self, resp: &mut ResponseHeader) -> pingora::Result<u64> {
        self.echoes.redact_head(resp)
    }

    /// The same for response trailers.
    pub fn redact_trailers(&self, trailers: &mut http::HeaderMap) -> u64 {
        self.echoes.redact_trailers(trailers)
    }

    pub fn body_scrubber(&self) -> Option<&Arc<crate::scrub::Scrubber>> {
        self.echoes.body_scrubber()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_at_is_read_as_utc_and_nothing_else() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2027-03-01T00:00:00Z"), Some(1_803_859_200));
        assert_eq!(parse_utc("2024-02-29T12:30:45Z"), Some(1_709_209_845));
        for bad in [
            "2027-03-01",
            "2027-03-01T00:00:00+01:00",
            "2027-13-01T00:00:00Z",
            "2027-03-01T24:00:00Z",
            "x",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
    use crate::echoes::REDACTED;

    fn secret(s: &str) -> Secret {
        Secret::new(Zeroizing::new(s.to_string())).unwrap()
    }

    #[test]
    fn header_kinds_replace_what_the_caller_sent() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.append_header("authorization", "Bearer caller").unwrap();
        req.append_header("authorization", "Basic caller2").unwrap();
        Credential::bearer(&secret("tok"))
            .unwrap()
            .inject_header(&mut req)
            .unwrap();
        let values: Vec<_> = req.headers.get_all("authorization").iter().collect();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0], "Bearer tok");
        assert!(values[0].is_sensitive());

        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        Credential::basic("svc", &secret("pw"))
            .unwrap()
            .inject_header(&mut req)
            .unwrap();
        assert_eq!(
            req.headers["authorization"],
            format!("Basic {}", STANDARD.encode("svc:pw"))
        );

        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.append_header("x-api-key", "mine").unwrap();
        Credential::header("X-API-Key", &secret("k"))
            .unwrap()
            .inject_header(&mut req)
            .unwrap();
        assert_eq!(req.headers.get_all("x-api-key").iter().count(), 1);
        assert_eq!(req.headers["x-api-key"], "k");
    }

    #[test]
    fn query_kind_replaces_same_named_parameters() {
        let c = Credential::query("api_key", &secret("s3 cr&t")).unwrap();
        assert_eq!(
            c.query_with_credential(None).unwrap().as_str(),
            "api_key=s3%20cr%26t"
        );
        assert_eq!(
            c.query_with_credential(Some("a=1&api_key=mine&api%5Fkey=x&api+key=y&b"))
                .unwrap()
                .as_str(),
            "a=1&api+key=y&b&api_key=s3%20cr%26t"
        );
        let bearer = Credential::bearer(&secret("t")).unwrap();
        assert_eq!(
            bearer.query_with_credential(Some("a=1")),
            None,
            "the caller's query goes upstream as it is"
        );
    }

    #[test]
    fn forbidden_and_invalid_header_names_are_refused() {
        for name in ["Host", "content-length", "Transfer-Encoding", "bad name"] {
            assert!(Credential::header(name, &secret("v")).is_err(), "{name}");
        }
        assert!(Credential::basic("a:b", &secret("v")).is_err());
    }

    #[test]
    fn echoed_secrets_are_redacted_in_every_form() {
        let c = Credential::basic("svc", &secret("pw-123")).unwrap();
        let mut resp = ResponseHeader::build(302, None).unwrap();
        resp.append_header("location", "https://x/cb?p=pw-123")
            .unwrap();
        resp.append_header(
            "www-authenticate",
            format!("Basic {}", STANDARD.encode("svc:pw-123")),
        )
        .unwrap();
        resp.append_header("content-type", "text/plain").unwrap();
        resp.append_header("link", "<https://x/pw-123>").unwrap();
        resp.append_header("link", "<https://x/ok>").unwrap();
        assert_eq!(c.redact(&mut resp).unwrap(), 3);
        assert_eq!(resp.headers["location"], REDACTED);
        let links: Vec<_> = resp.headers.get_all("link").iter().collect();
        assert_eq!(links, [REDACTED, "<https://x/ok>"]);
        assert_eq!(resp.headers["www-authenticate"], REDACTED);
        assert_eq!(resp.headers["content-type"], "text/plain");

        let q = Credential::query("k", &secret("a b")).unwrap();
        let mut resp = ResponseHeader::build(302, None).unwrap();
        resp.append_header("link", "<https://x/?k=a%20b>").unwrap();
        q.redact(&mut resp).unwrap();
        assert_eq!(resp.headers["link"], REDACTED);
    }

    #[test]
    fn debug_shows_no_secret() {
        let dbg = format!(
            "{:?}",
            Credential::header("x-key", &secret("very-secret")).unwrap()
        );
        assert!(!dbg.contains("very-secret"), "{dbg}");
    }
}
