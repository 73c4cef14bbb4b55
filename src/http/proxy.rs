//! pingora glue: each `ProxyHttp` hook hands over to the module that owns
//! the decision (routing, upstream, errors, audit, metrics) and keeps no
//! policy of its own.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header::{self, HeaderName};
use pingora::connectors::l4::BindTo;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::protocols::{TcpKeepalive, ALPN};
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::{H1UpgradePolicy, HttpPeer, HttpUpstreamRequestPolicy};
use pingora::{Error, ErrorType, Result};
use zeroize::Zeroizing;

use crate::access;
use crate::audit::AuditRecord;
use crate::callers::{self, Caller, Identified, Presented};
use crate::config::{Config, CredentialSource, DataSource, Protocol};
use crate::connect;
use crate::credentials::Credential;
use crate::errors::{classify, ErrorCode, Refusal};
use crate::http::route;
use crate::metrics::CloseReason;
use crate::oauth2::Token;
use crate::scrub::BodyScrub;
use crate::sigv4::Payload;
use crate::state::{RequestId, Shared};
use crate::throttle::Peer;
use crate::tls::TlsIdentity;

/// The `caller` label of requests whose caller could not be identified;
/// caller names follow data source naming, so it never collides.
const NO_CALLER: &str = "-";

/// A `&'static str`, not a `HeaderName`: pingora keeps a case-preserving
/// copy of every name it inserts, and shares static bytes where it would
/// allocate and copy a `HeaderName`'s.
const REQUEST_ID_HEADER: &str = "x-sealgate-request-id";

/// Response headers that describe one hop and must not cross sealgate.
/// `Transfer-Encoding` is absent on purpose: pingora re-frames each hop
/// from it and removes it where the downstream protocol has no use for it.
const HOP_BY_HOP_RESPONSE: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

pub struct SealgateProxy {
    shared: Arc<Shared>,
    /// `[proxy] idle_timeout_s` as it was at start: like the h2 idle
    /// timeout set on the listener, it changes only with a restart.
    idle_timeout: Duration,
}

impl SealgateProxy {
    pub fn new(shared: Arc<Shared>, idle_timeout: Duration) -> Self {
        SealgateProxy {
            shared,
            idle_timeout,
        }
    }
}

/// Per-request state. Dropping it ends the request's `active_requests`
/// share, whichever way the request ended.
pub struct RequestCtx {
    shared: Arc<Shared>,
    started: Instant,
    request_id: RequestId,
    config: Arc<Config>,
    caller: Option<Arc<Caller>>,
    datasource: Option<Arc<DataSource>>,
    /// Holds the credential when it travels in the query string.
    upstream_target: Zeroizing<String>,
    upstream_addr: Option<SocketAddr>,
    connect_attempts: usize,
    /// How many attempts the resolved addresses and egress addresses allow.
    connect_limit: usize,
    /// Where this request's rotation through its region's addresses starts.
    egress_start: Option<usize>,
    egress_ip: Option<IpAddr>,
    /// Whose credential the request uses, once admitted.
    credential_source: Option<CredentialSource>,
    /// The access token this request carries, for a credential sealgate
    /// mints.
    token: Option<Arc<Token>>,
    /// The body read to sign its hash (SigV4 services other than S3).
    signed_body: Option<bytes::Bytes>,
    /// The forms of this request's SigV4 signature, redacted from the
    /// response head like a key.
    signature: Option<crate::echoes::Echoes>,
    /// The response body's scrubbers, one per secret it could carry (the
    /// credential, a minted token), set with the response head.
    scrubs: Vec<BodyScrub>,
    refusal: Option<Refusal>,
    /// Set once the request reached `request_filter`, with what its audit
    /// record needs should the request be cut off before `logging` runs.
    started_request: Option<StartedRequest>,
    /// The status of the response head the caller was sent, if any.
    status_sent: u16,
}

struct StartedRequest {
    method: http::Method,
    /// Bounded by `route::MAX_TARGET`.
    path: String,
}

impl StartedRequest {
    fn of(req: &RequestHeader) -> StartedRequest {
        StartedRequest {
            method: req.method.clone(),
            path: route::bounded(req.uri.path()).to_owned(),
        }
    }
}

/// What stands in `error` for a request cut off before it finished: by the
/// end of the drain's grace period, or otherwise (its task ended).
const CUT_BY_DRAIN: &str = "cut_by_drain";
const CUT_OFF: &str = "cut_off";

impl Drop for RequestCtx {
    /// A request that reached sealgate's logic and was cut off (the grace
    /// period ended, its task was dropped) still leaves its one record.
    fn drop(&mut self) {
        self.shared.metrics.active_requests.dec();
        if let Some(started) = self.started_request.take() {
            let record =
                self.audit_record(&started, self.status_sent, (0, 0), Some(self.cut_reason()));
            self.shared.audit.record_now(&record);
        }
    }
}

impl RequestCtx {
    /// Why a request that never got its answer ended.
    fn cut_reason(&self) -> &'static str {
        if self.shared.lifecycle.is_draining() {
            CUT_BY_DRAIN
        } else {
            CUT_OFF
        }
    }

    /// The identified caller's name; `local` for loopback peers when no
    /// callers are configured; none when the caller was not identified.
    fn caller_name(&self) -> Option<&str> {
        match (&self.caller, &self.refusal) {
            (Some(caller), _) => Some(caller.name.as_str()),
            (None, Some(r))
                if matches!(
                    r.code,
                    ErrorCode::CallerUnauthenticated | ErrorCode::CallerThrottled
                ) =>
            {
                None
            }
            (None, _) => Some(callers::LOCAL),
        }
    }

    /// The credential this request uses: the caller's own, else the data
    /// source's; set once the request is admitted.
    fn credential(&self) -> Option<&Credential> {
        self.credential_source?;
        let ds = self.datasource.as_ref()?;
        let caller = self.caller.as_ref().map(|c| c.name.as_str());
        ds.credential_for(caller)?.0.ready()
    }

    /// The request's audit record (SPEC section 7).
    fn audit_record<'a>(
        &'a self,
        started: &'a StartedRequest,
        status: u16,
        (request_bytes, response_bytes): (u64, u64),
        error: Option<&'static str>,
    ) -> AuditRecord<'a> {
        let (decision, reason) = access::verdict(self.refusal.as_ref(), self.datasource.as_deref());
        AuditRecord {
            ts: std::time::SystemTime::now(),
            event: None,
            request_id: self.request_id.as_str(),
            caller: self.caller_name(),
            datasource: self.datasource.as_ref().map(|d| d.name.as_str()),
            method: started.method.as_str(),
            path: Some(&started.path),
            upstream: self.upstream_addr,
            egress_ip: self.egress_ip,
            region: self.datasource.as_ref().and_then(|d| d.region_name()),
            decision,
            reason,
            status: Some(status),
            request_bytes,
            response_bytes,
            duration: self.started.elapsed(),
            error: error.or(self.refusal.as_ref().map(|r| r.code.as_str())),
            protocol: Protocol::Http.as_str(),
            credential: self.credential_source.map(CredentialSource::as_str),
            client_user: None,
            db_user: None,
            statements: None,
            statement: None,
        }
    }
}

/// Writes sealgate's own JSON error response.
async fn respond(session: &mut Session, ctx: &mut RequestCtx, refusal: &Refusal) -> Result<()> {
    ctx.status_sent = refusal.code.status();
    let body = refusal.body();
    let mut resp = ResponseHeader::build(refusal.code.status(), Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
    if refusal.code == ErrorCode::CallerThrottled {
        resp.insert_header(header::RETRY_AFTER, crate::throttle::BLOCK.as_secs())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for SealgateProxy {
    type CTX = RequestCtx;

    /// None. pingora's default is a compression module, disabled, whose
    /// per-request context and filters cost about 700 instructions per
    /// request. sealgate passes bodies as the data source sent them:
    /// compressing responses that may carry secrets would also open them
    /// to BREACH-style guessing.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        // pingora creates the context right after reading the request head.
        crate::http::limits::head_read();
        self.shared.metrics.active_requests.inc();
        RequestCtx {
            shared: self.shared.clone(),
            started: Instant::now(),
            request_id: self.shared.next_request_id(),
            config: self.shared.config.load_full(),
            caller: None,
            datasource: None,
            upstream_target: Zeroizing::new(String::new()),
            upstream_addr: None,
            connect_attempts: 0,
            connect_limit: 0,
            egress_start: None,
            egress_ip: None,
            credential_source: None,
            token: None,
            signed_body: None,
            signature: None,
            scrubs: Vec::new(),
            refusal: None,
            started_request: None,
            status_sent: 0,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // pingora waits on a caller's body, or for it to read the response,
        // with no deadline unless one is set.
        let idle = Some(self.idle_timeout);
        session.set_read_timeout(idle);
        session.set_write_timeout(idle);
        // Requests a client sends before reading the answer to the last
        // one are answered in order, not dropped on a kept-alive connection.
        session.set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.started_request = Some(StartedRequest::of(session.req_header()));
        // Nothing goes out that the audit trail could not record.
        self.shared.audit.wait_writable().await;
        // Who is asking comes first, so an unknown caller learns nothing,
        // not even which data sources exist.
        let client_ip = session
            .as_downstream()
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let peer_is_loopback = client_ip.is_some_and(|ip| ip.to_canonical().is_loopback());
        let token = session
            .req_header()
            .headers
            .get(header::PROXY_AUTHORIZATION);
        let tls_identity = session
            .as_downstream()
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|tls| tls.extension.get::<TlsIdentity>())
            .map(|id| id.0.as_str());
        let unix_uid = crate::unix_listener::peer_uid();
        let peer = unix_uid.map(Peer::Uid).or(client_ip.map(Peer::of_ip));
        let throttle = &self.shared.throttle;
        if peer.is_some_and(|p| throttle.is_blocked(p, ctx.started)) {
            self.count_identification_failure("throttled");
            let refusal = Refusal::new(
                ErrorCode::CallerThrottled,
                "too many failed caller identifications from this peer; retry later",
            );
            respond(session, ctx, &refusal).await?;
            ctx.refusal = Some(refusal);
            return Ok(true);
        }
        let presented = Presented {
            tls_identity,
            unix_uid,
            token: token.map(|v| v.as_bytes()),
            password: None,
            local_peer: peer_is_loopback || unix_uid.is_some(),
        };
        match ctx.config.callers.identify(&presented) {
            Identified::Caller(caller) => ctx.caller = Some(caller),
            Identified::Local => {}
            Identified::Unauthenticated(why) => {
                if let Some(peer) = peer {
                    throttle.failed(peer, Instant::now());
                }
                self.count_identification_failure("refused");
                let refusal = Refusal::new(ErrorCode::CallerUnauthenticated, why);
                respond(session, ctx, &refusal).await?;
                ctx.refusal = Some(refusal);
                return Ok(true);
            }
        }
        if let Err(unfit) = crate::http::hygiene::check(session.req_header()) {
            if unfit.close {
                session.set_keepalive(None);
            }
            respond(session, ctx, &unfit.refusal).await?;
            ctx.refusal = Some(unfit.refusal);
            return Ok(true);
        }
        let uri = &session.req_header().uri;
        let routed = match route::split(uri.path()) {
            Ok(r) => match ctx.config.datasources.get(r.datasource).cloned() {
                Some(ds) => {
                    ctx.datasource = Some(ds.clone());
                    self.admit(ctx, &ds).map(|()| {
                        let with_credential = ctx
                            .credential()
                            .and_then(|c| c.query_with_credential(uri.query()));
                        ctx.upstream_target = Zeroizing::new(route::upstream_target(
                            &ds.upstream.base_path,
                            r.rest,
                            with_credential.as_ref().map(|q| q.as_str()).or(uri.query()),
                        ));
                    })
                }
                None => Err(Refusal::new(
                    ErrorCode::UnknownDatasource,
                    format!("no data source named \"{}\"", r.datasource.escape_default()),
                )),
            },
            Err(route::RouteError::NoDatasource) => Err(Refusal::new(
                ErrorCode::UnknownDatasource,
                "the path must start with /<datasource>/",
            )),
            Err(route::RouteError::Escape(how)) => Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("{how}: it could leave the data source's base path"),
            )),
        };
        let routed = match routed {
            Ok(()) => match self.mint(ctx).await {
                Ok(()) => self.read_signed_body(session, ctx).await,
                Err(refusal) => Err(refusal),
            },
            Err(refusal) => Err(refusal),
        };
        let oversized = ctx
            .signed_body
            .as_ref()
            .is_some_and(|b| b.len() > crate::sigv4::PINGORA_RETRY_BUFFER);
        let routed = match routed {
            Ok(()) if oversized => self.send_signed_directly(session, ctx).await.map(|()| true),
            Ok(()) => Ok(false),
            Err(refusal) => Err(refusal),
        };
        match routed {
            Ok(handled) => Ok(handled),
            Err(refusal) => {
                respond(session, ctx, &refusal).await?;
                ctx.refusal = Some(refusal);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(ds) = ctx.datasource.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no data source chosen");
        };
        let target = &ds.upstream;
        let addrs =
            match connect::judged_addresses(&self.shared, &ctx.config, &ds, &ds.upstream).await {
                Ok(addrs) => addrs,
                Err(refusal) => {
                    let denied = refusal.code == ErrorCode::EgressDenied;
                    ctx.refusal = Some(refusal);
                    return Err(if denied {
                        Error::new_in(ErrorType::HTTPStatus(403))
                    } else {
                        Error::new_up(ErrorType::ConnectError)
                    });
                }
            };
        let attempt = connect::attempt(&ds, &addrs, &mut ctx.egress_start, ctx.connect_attempts);
        ctx.connect_attempts += 1;
        let connect::Attempt {
            addr,
            egress_ip,
            limit,
        } = match attempt {
            Ok(attempt) => attempt,
            Err(refusal) => {
                ctx.refusal = Some(refusal);
                return Err(Error::new_up(ErrorType::BindError));
            }
        };
        ctx.upstream_addr = Some(addr);
        ctx.egress_ip = egress_ip;
        ctx.connect_limit = limit;
        tracing::debug!(
            request_id = %ctx.request_id,
            datasource = %ds.name,
            upstream = %addr,
            egress_ip = ?egress_ip,
            attempt = ctx.connect_attempts,
            "choosing upstream and egress address"
        );

        let mut peer = HttpPeer::new(addr, target.tls, target.sni.clone());
        // pingora's pool key ignores the per-peer CA and the bound source
        // address: a pooled connection is reused only by the same data
        // source, from the same egress address, under the same config (a
        // reload may change what a data source trusts or may reach).
        peer.group_key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (ds.pool_key, ctx.config.generation, egress_ip).hash(&mut h);
            h.finish()
        };
        if let Some(ip) = egress_ip {
            let mut bind = BindTo::default();
            bind.addr = Some(SocketAddr::new(ip, 0));
            peer.options.bind_to = Some(bind);
        }
        let options = &mut peer.options;
        options.connection_timeout = Some(ds.connect_timeout);
        options.total_connection_timeout = Some(ds.connect_timeout);
        options.read_timeout = Some(ds.timeout);
        options.write_timeout = Some(ds.timeout);
        options.idle_timeout = Some(ds.idle_timeout);
        options.verify_cert = true;
        options.verify_hostname = true;
        options.ca = ds.ca.clone();
        options.alpn = if target.tls { ALPN::H2H1 } else { ALPN::H1 };
        options.tcp_keepalive = Some(TcpKeepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::from_secs(0),
        });
        options.http_upstream_request_policy = HttpUpstreamRequestPolicy {
            h1_upgrade: H1UpgradePolicy::Deny,
            ..HttpUpstreamRequestPolicy::standard()
        };
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // pingora reports a failed bind as an internal error.
        let kind = match e.etype() {
            ErrorType::InternalError | ErrorType::BindError if ctx.egress_ip.is_some() => "bind",
            ErrorType::ConnectTimedout => "timeout",
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
                "tls"
            }
            _ => "connect",
        };
        if let Some(ds) = &ctx.datasource {
            self.count_upstream_error(&ds.name, kind);
        }
        // Another resolved or egress address may work; try each once. A
        // timeout is not retried: the caller has already waited it out.
        let retry =
            ctx.connect_attempts < ctx.connect_limit && e.etype() != &ErrorType::ConnectTimedout;
        if kind == "bind" && !retry {
            ctx.refusal = Some(Refusal::new(
                ErrorCode::UpstreamUnreachable,
                "no egress address of the data source's region could be bound",
            ));
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.prepare_upstream_head(upstream_request, ctx)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.filter_response(upstream_response, ctx)
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        upstream_trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(ds), Some(credential)) = (&ctx.datasource, ctx.credential()) {
            let mut revealed = credential.redact_trailers(upstream_trailers);
            if let Some(token) = &ctx.token {
                revealed += token.echoes.redact_trailers(upstream_trailers);
            }
            self.count_scrubbed(&ds.name, "header", revealed);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if !ctx.scrubs.is_empty() {
            self.scrub_body(body, end_of_stream, ctx);
        }
        Ok(None)
    }

    /// Trailers end an h2 body that had no final DATA frame. Should the
    /// body's end still be held (it began like a secret), pingora can only
    /// write it in the trailers' place: the held bytes are sent as the
    /// body's end and the trailers dropped, rather than the body cut short.
    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        _upstream_trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<bytes::Bytes>> {
        if !ctx.scrubs.iter().any(BodyScrub::holds_bytes) {
            return Ok(None);
        }
        let mut rest = None;
        self.scrub_body(&mut rest, true, ctx);
        Ok(rest)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if e.esource() == &pingora::ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            )
        {
            self.shared
                .metrics
                .downstream_closed(CloseReason::IdleTimeout)
                .inc();
        }
        let refusal = ctx.refusal.clone().or_else(|| classify(e));
        let mut error_code = 0;
        if let Some(refusal) = &refusal {
            error_code = refusal.code.status();
            // Once the response head is out, the only honest signal left is
            // to cut the connection, which pingora does after this hook.
            if session.response_written().is_none() {
                if let Err(write_err) = respond(session, ctx, refusal).await {
                    tracing::debug!(error = %write_err, "could not send the error response");
                }
            }
        }
        ctx.refusal = refusal;
        log_failure(e, ctx, error_code);
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// pingora's own line prints the error with its context, which for a
    /// malformed upstream head is the raw head: `fail_to_proxy` logs what
    /// on-call needs instead.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// The same for a failed attempt that is retried.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        tracing::warn!(
            request_id = %ctx.request_id,
            datasource = ctx.datasource.as_ref().map_or("-", |d| d.name.as_str()),
            error = error.etype().as_str(),
            source = error.esource().as_str(),
            "attempt failed; retrying"
        );
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or_else(
            || ctx.refusal.as_ref().map_or(0, |r| r.code.status()),
            |r| r.status.as_u16(),
        );
        let elapsed = ctx.started.elapsed();
        let metrics = &self.shared.metrics;
        let (request_bytes, response_bytes) = (
            session.body_bytes_read() as u64,
            session.body_bytes_sent() as u64,
        );
        let series = ctx
            .datasource
            .as_ref()
            .map_or(&metrics.no_datasource, |ds| {
                ds.series
                    .get_or_init(|| metrics.datasource_series(&ds.name))
            });
        series.count_answer(
            &metrics.requests,
            ctx.caller_name().unwrap_or(NO_CALLER),
            status,
        );
        series.duration.observe(elapsed.as_secs_f64());
        series.request_bytes.inc_by(request_bytes);
        series.response_bytes.inc_by(response_bytes);

        if ctx.started_request.is_none() {
            ctx.started_request = Some(StartedRequest::of(session.req_header()));
        }
        // Ended by an error before any answer: cut off, as a request whose
        // task is dropped is. At the end of the grace period a request's
        // sockets can fail before its task is dropped (pingora's
        // per-thread runtimes did so), and it must read the same either way.
        let cut = (status == 0 && e.is_some()).then(|| ctx.cut_reason());
        if let Some(started) = &ctx.started_request {
            let record = ctx.audit_record(started, status, (request_bytes, response_bytes), cut);
            self.shared.audit.record(&record).await;
        }
        // Only once queued: a request cut off while it waits for the queue
        // is recorded when its state is dropped.
        ctx.started_request = None;
        // Only now, with the record queued: a connection closed for its
        // next head's deadline must not drop this request's record.
        crate::http::limits::awaiting_next_head();
    }

    /// pingora logs this with every error; the default includes the query
    /// string, which may carry secrets, so it is reduced to what on-call
    /// needs to find the audit record.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        format!(
            "{} /{} request_id={}",
            session.req_header().method,
            ctx.datasource.as_ref().map_or("-", |d| d.name.as_str()),
            ctx.request_id
        )
    }
}

impl SealgateProxy {
    /// Whether this request may use this data source (`access::admit`),
    /// served by this front only if it speaks HTTP.
    fn admit(&self, ctx: &mut RequestCtx, ds: &DataSource) -> std::result::Result<(), Refusal> {
        if ds.protocol != Protocol::Http {
            return Err(Refusal::new(
                ErrorCode::UnknownDatasource,
                format!(
                    "\"{}\" is a {} data source, served on sealgate's {} listener",
                    ds.name,
                    ds.protocol.as_str(),
                    ds.protocol.as_str()
                ),
            ));
        }
        let admitted = access::admit(&self.shared.metrics, ctx.caller.as_deref(), ds)?;
        ctx.credential_source = admitted.source;
        Ok(())
    }

    /// What every request head sent upstream goes through: the data
    /// source's target and Host, the caller's hop-by-hop and spoofable
    /// headers removed, then the credential (injected, minted or signed).
    fn prepare_upstream_head(
        &self,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(ds) = ctx.datasource.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no data source chosen");
        };
        let uri = http::Uri::builder()
            .path_and_query(ctx.upstream_target.as_str())
            .build()
            .map_err(|_| Error::explain(ErrorType::HTTPStatus(400), "request target"))?;
        upstream_request.set_uri(uri);
        upstream_request.insert_header(header::HOST, ds.upstream.authority.as_str())?;
        crate::http::hygiene::strip_for_upstream(upstream_request);
        // `request_filter` admitted only a credential that opened.
        if let Some(credential) = ctx.credential() {
            credential.inject_header(upstream_request)?;
        }
        if ds.scrub_responses {
            // The body must arrive as bytes sealgate can read, and whole:
            // two ranges could each carry half of the secret.
            upstream_request.insert_header(header::ACCEPT_ENCODING, "identity")?;
            // pingora's removal of an absent name still walks its
            // case-preserving copy: look first, as nearly no request has one.
            for name in [header::RANGE, header::IF_RANGE] {
                if upstream_request.headers.contains_key(&name) {
                    upstream_request.remove_header(&name);
                }
            }
        }
        if let Some(token) = &ctx.token {
            upstream_request.insert_header(header::AUTHORIZATION, token.header.clone())?;
        }
        if let Some(signer) = ctx.credential().and_then(|c| c.signer()) {
            let payload = match &ctx.signed_body {
                Some(body) => Payload::Whole(body),
                None => Payload::Unsigned,
            };
            let scheme = if ds.upstream.tls { "https" } else { "http" };
            let signature = signer
                .sign(upstream_request, scheme, &ds.upstream.authority, payload)
                .map_err(|why| Error::explain(ErrorType::InternalError, why))?;
            ctx.signature = Some(signature);
        }
        Ok(())
    }

    /// What every upstream response head goes through: hop-by-hop and
    /// (unless allowed) cookie headers removed, every credential form
    /// redacted, a 401 answered with an early token refresh, the reason
    /// phrase dropped, the request id added.
    fn filter_response(
        &self,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        strip_hop_by_hop_response(upstream_response);
        if let Some(ds) = &ctx.datasource {
            if !ds.pass_set_cookie {
                upstream_response.remove_header(&header::SET_COOKIE);
            }
            if let Some(credential) = ctx.credential() {
                let revealed = credential.redact(upstream_response)?;
                self.count_scrubbed(&ds.name, "header", revealed);
            }
            if let Some(signature) = &ctx.signature {
                let revealed = signature.redact_head(upstream_response)?;
                self.count_scrubbed(&ds.name, "header", revealed);
            }
            if let Some(token) = &ctx.token {
                let revealed = token.echoes.redact_head(upstream_response)?;
                self.count_scrubbed(&ds.name, "header", revealed);
                if upstream_response.status == http::StatusCode::UNAUTHORIZED {
                    if let Some(client) = ctx.credential().and_then(|c| c.minted()) {
                        client.rejected(token, &self.shared, &ctx.config, ds);
                    }
                }
            }
        }
        self.start_scrubbing(upstream_response, ctx)?;
        // The reason phrase is free text only the upstream chose: it may
        // echo anything, and no client needs it.
        upstream_response.set_reason_phrase(None)?;
        upstream_response.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        ctx.status_sent = upstream_response.status.as_u16();
        Ok(())
    }

    /// For a data source that scrubs response bodies: one scrubber per
    /// secret the body could carry. A body in an encoding sealgate cannot
    /// read is refused rather than passed unread.
    fn start_scrubbing(&self, response: &ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        ctx.scrubs.clear();
        let Some(ds) = ctx.datasource.as_ref().filter(|ds| ds.scrub_responses) else {
            return Ok(());
        };
        let encoded = response
            .headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
        let refuse = |ctx: &mut RequestCtx, refusal: Refusal| {
            let error = Error::explain(ErrorType::HTTPStatus(refusal.code.status()), "scrub");
            ctx.refusal = Some(refusal);
            Err(error)
        };
        if encoded {
            let message = format!(
                "\"{}\" answered with a Content-Encoding although sealgate asked for identity; \
                 its body cannot be scrubbed (scrub_responses = false passes it unread)",
                ds.name
            );
            return refuse(ctx, Refusal::new(ErrorCode::UnscrubbableResponse, message));
        }
        let secrets = ctx
            .credential()
            .map(|c| c.body_scrubber())
            .into_iter()
            .chain(ctx.token.as_ref().map(|t| t.echoes.body_scrubber()));
        let scrubbers: Option<Vec<BodyScrub>> = secrets
            .map(|scrubber| scrubber.map(|s| BodyScrub::new(s.clone())))
            .collect();
        match scrubbers {
            Some(scrubbers) => {
                ctx.scrubs = scrubbers;
                Ok(())
            }
            None => {
                let message = "the credential's response scrubber could not be built";
                refuse(ctx, Refusal::new(ErrorCode::Internal, message))
            }
        }
    }

    /// Passes one piece of the response body through the scrubbers.
    fn scrub_body(&self, body: &mut Option<bytes::Bytes>, end: bool, ctx: &mut RequestCtx) {
        let mut found = 0;
        for scrub in &mut ctx.scrubs {
            let (passed, n) = scrub.pass(body.take(), end);
            *body = passed;
            found += n;
        }
        if let (Some(ds), true) = (&ctx.datasource, found > 0) {
            self.count_scrubbed(&ds.name, "body", found);
        }
    }

    /// A signed body longer than pingora's retry buffer holds, sent by
    /// sealgate itself on a connection of its own (the same egress path,
    /// verified TLS and deadlines), its response written back through the
    /// same filters. Refusals only before any of the response was written.
    async fn send_signed_directly(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), Refusal> {
        let (Some(ds), Some(body)) = (ctx.datasource.clone(), ctx.signed_body.clone()) else {
            return Ok(());
        };
        let internal = |why: String| Refusal::new(ErrorCode::Internal, why);
        let mut head = session.req_header().clone();
        head.remove_header(&header::TRANSFER_ENCODING);
        head.insert_header(header::CONTENT_LENGTH, body.len())
            .map_err(|e| internal(e.to_string()))?;
        self.prepare_upstream_head(&mut head, ctx)
            .map_err(|e| match e.etype() {
                ErrorType::HTTPStatus(400) => {
                    Refusal::new(ErrorCode::BadRequest, "the request target cannot be sent")
                }
                _ => internal(e.to_string()),
            })?;
        let mut request = http::Request::builder()
            .method(head.method.clone())
            .uri(head.uri.clone());
        for (name, value) in head.headers.iter() {
            request = request.header(name, value);
        }
        let request = request
            .body(http_body_util::Full::new(body))
            .map_err(|e| internal(e.to_string()))?;
        let (io, attempt) = connect::open(
            &self.shared,
            &ctx.config,
            &ds,
            &ds.upstream,
            ds.db_tls.as_ref(),
        )
        .await
        .map_err(|f| f.refusal)?;
        ctx.upstream_addr = Some(attempt.addr);
        ctx.egress_ip = attempt.egress_ip;
        let exchange = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await
        };
        let response = match tokio::time::timeout(ds.timeout, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    ErrorCode::UpstreamUnreachable,
                    format!("the upstream failed: {e}"),
                ))
            }
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::UpstreamTimeout,
                    "the upstream did not answer within timeout_ms",
                ))
            }
        };
        let (parts, mut body) = response.into_parts();
        let mut head = ResponseHeader::build(parts.status, Some(parts.headers.len()))
            .map_err(|e| internal(e.to_string()))?;
        for (name, value) in parts.headers.iter() {
            head.append_header(name.clone(), value.clone())
                .map_err(|e| internal(e.to_string()))?;
        }
        self.filter_response(&mut head, ctx).map_err(|e| {
            ctx.refusal
                .take()
                .unwrap_or_else(|| internal(e.to_string()))
        })?;
        if session
            .write_response_header(Box::new(head), false)
            .await
            .is_err()
        {
            return Ok(());
        }
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                // A truncated response must not look complete.
                session.shutdown().await;
                return Ok(());
            };
            if let Ok(data) = frame.into_data() {
                let mut data = Some(data);
                self.scrub_body(&mut data, false, ctx);
                if session.write_response_body(data, false).await.is_err() {
                    return Ok(());
                }
            }
        }
        let mut rest = None;
        self.scrub_body(&mut rest, true, ctx);
        let _ = session.write_response_body(rest, true).await;
        Ok(())
    }

    /// For a SigV4 service that signs bodies (all but S3), the whole body,
    /// read before the head is signed (at most `MAX_SIGNED_BODY`). pingora
    /// sends on what its retry buffer holds; a longer body is sent by
    /// `send_signed_directly`.
    async fn read_signed_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), Refusal> {
        let signs_body = ctx
            .credential()
            .and_then(|c| c.signer())
            .is_some_and(|s| !s.streams());
        if !signs_body {
            return Ok(());
        }
        let too_large = || {
            Refusal::new(
                ErrorCode::BodyTooLarge,
                format!(
                    "a body signed for this service may be at most {} bytes",
                    crate::sigv4::MAX_SIGNED_BODY
                ),
            )
        };
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > crate::sigv4::MAX_SIGNED_BODY) {
            return Err(too_large());
        }
        session.enable_retry_buffering();
        let mut body = bytes::BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > crate::sigv4::MAX_SIGNED_BODY {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(Refusal::new(
                        ErrorCode::BadRequest,
                        "the request body could not be read",
                    ))
                }
            }
        }
        ctx.signed_body = Some(body.freeze());
        Ok(())
    }

    /// For a credential sealgate mints, the token the request will carry
    /// (waiting for a fetch if there is none valid).
    async fn mint(&self, ctx: &mut RequestCtx) -> std::result::Result<(), Refusal> {
        let Some(client) = ctx.credential().and_then(|c| c.minted()).cloned() else {
            return Ok(());
        };
        let Some(ds) = ctx.datasource.clone() else {
            return Ok(());
        };
        ctx.token = Some(client.token(&self.shared, &ctx.config, &ds).await?);
        Ok(())
    }

    fn count_identification_failure(&self, outcome: &str) {
        self.shared
            .metrics
            .caller_identification_failures
            .with_label_values(&[outcome])
            .inc();
    }

    fn count_scrubbed(&self, datasource: &str, place: &str, revealed: u64) {
        if revealed > 0 {
            self.shared
                .metrics
                .secrets_scrubbed
                .with_label_values(&[datasource, place])
                .inc_by(revealed);
        }
    }

    fn count_upstream_error(&self, datasource: &str, kind: &str) {
        self.shared.metrics.count_upstream_error(datasource, kind);
    }
}

/// One line per failed request: the error's kind and side, never its
/// context (which may quote wire bytes). A caller that went away is routine.
fn log_failure(e: &Error, ctx: &RequestCtx, status: u16) {
    let datasource = ctx.datasource.as_ref().map_or("-", |d| d.name.as_str());
    let (error, source) = (e.etype().as_str(), e.esource().as_str());
    let request_id = ctx.request_id.as_str();
    macro_rules! failed {
        ($level:expr) => {
            tracing::event!(
                $level,
                request_id,
                datasource,
                error,
                source,
                status,
                "request failed"
            )
        };
    }
    if e.esource() == &pingora::ErrorSource::Downstream {
        failed!(tracing::Level::INFO);
    } else {
        failed!(tracing::Level::ERROR);
    }
}

/// One pass over the headers finds what to remove; most responses carry
/// nothing but `Connection: keep-alive`, and removing absent names one by
/// one cost more than the rest of sealgate's response handling.
fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for (name, value) in resp.headers.iter() {
        if name == header::CONNECTION {
            let nominated = value
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                // Connection options, not header names; `keep-alive` is
                // removed below as a hop-by-hop header when present.
                .filter(|t| {
                    !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
                })
                .filter_map(|t| HeaderName::from_bytes(t).ok())
                .filter(|n| n != header::TRANSFER_ENCODING && n != header::CONTENT_LENGTH);
            doomed.extend(nominated);
        }
        if HOP_BY_HOP_RESPONSE.contains(&name.as_str()) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        resp.remove_header(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_standard_and_nominated_hop_by_hop_headers() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            (
                "connection",
                "close, X-Hop , keep-alive, content-length, x-absent",
            ),
            ("x-hop", "1"),
            ("content-length", "0"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("upgrade", "h2c"),
            ("trailer", "x"),
            ("content-type", "text/plain"),
        ] {
            resp.append_header(k, v).unwrap();
        }
        strip_hop_by_hop_response(&mut resp);
        let left: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-length", "content-type"]);
    }
}
