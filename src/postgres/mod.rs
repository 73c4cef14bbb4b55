//! The PostgreSQL front (SPEC section 9): an app connects with any
//! PostgreSQL client and no database password; sealgate identifies the
//! caller, picks the data source named by the startup's `database`, logs
//! in upstream with the sealed password over verified TLS, and relays the
//! session. Served by pingora like the HTTP front (its listeners, fd
//! handling and graceful shutdown), with this `ServerApp` per connection.

mod cancel;
mod login;
mod relay;
mod tracking;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::access;
use crate::audit::AuditRecord;
use crate::callers::{self, Caller, Identified, Presented};
use crate::config::{Config, CredentialSource, DataSource, Protocol, StatementAudit};
use crate::errors::{ErrorCode, Refusal};
use crate::state::{RequestId, Shared};
use crate::throttle::Peer;
use wire::ReadError;

/// A byte stream either leg may be: TCP, Unix, or TLS over either.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Startup parameters passed on to the server; any other is refused.
const PASSED_PARAMETERS: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
];

/// The front, shared by its TCP and Unix listeners.
#[derive(Clone)]
pub struct PostgresFront {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    permits: Arc<tokio::sync::Semaphore>,
    cancels: cancel::CancelKeys,
}

impl PostgresFront {
    pub fn new(shared: Arc<Shared>) -> Result<Option<PostgresFront>, String> {
        let config = shared.config.load();
        let Some(front) = &config.postgres else {
            return Ok(None);
        };
        let tls = match &shared.postgres_tls {
            None => None,
            Some(handles) => Some(TlsAcceptor::from(crate::tls::in_protocol_server_config(
                handles.cert.clone(),
                handles.client.clone(),
            )?)),
        };
        Ok(Some(PostgresFront {
            inner: Arc::new(Inner {
                handshake_timeout: front.handshake_timeout,
                permits: Arc::new(tokio::sync::Semaphore::new(front.max_connections)),
                tls,
                cancels: cancel::CancelKeys::default(),
                shared: shared.clone(),
            }),
        }))
    }
}

#[async_trait]
impl ServerApp for PostgresFront {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner.serve(stream).await;
        None
    }
}

/// What one session's audit record and metrics are made of.
struct SessionLog {
    id: RequestId,
    started: Instant,
    config: Arc<Config>,
    caller: Option<Arc<Caller>>,
    /// No callers are configured and the peer is local.
    local: bool,
    datasource: Option<Arc<DataSource>>,
    client_user: Option<String>,
    db_user: Option<String>,
    credential: Option<CredentialSource>,
    upstream: Option<SocketAddr>,
    egress_ip: Option<std::net::IpAddr>,
    tally: relay::Tally,
    statements: u64,
    refusal: Option<Refusal>,
    /// An error code for an ending that is not a refusal.
    error: Option<&'static str>,
}

impl SessionLog {
    /// The identified caller; `local` for a local peer when no callers are
    /// configured; none when the caller was not identified.
    fn caller_name(&self) -> Option<&str> {
        match (&self.caller, self.local) {
            (Some(c), _) => Some(c.name.as_str()),
            (None, true) => Some(callers::LOCAL),
            (None, false) => None,
        }
    }
}

/// How the handshake ended without a session.
enum Unstarted {
    /// Refused: the client is sent the ErrorResponse.
    Refused(Refusal),
    /// Nothing to answer: a cancel request, or a client that went away.
    Silent,
}

/// A client that finished the handshake: who it is and where it goes.
struct Handshaken {
    io: Box<dyn Io>,
    parameters: Vec<(String, String)>,
}

impl Inner {
    async fn serve(self: &Arc<Self>, stream: Stream) {
        let shared = &self.shared;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned())
            .and_then(|a| a.as_inet().copied());
        let unix_uid = crate::unix_listener::peer_uid();
        let mut log = SessionLog {
            id: shared.next_request_id(),
            started: Instant::now(),
            config: shared.config.load_full(),
            caller: None,
            local: false,
            datasource: None,
            client_user: None,
            db_user: None,
            credential: None,
            upstream: None,
            egress_ip: None,
            tally: relay::Tally::default(),
            statements: 0,
            refusal: None,
            error: None,
        };
        let mut io: Option<Box<dyn Io>> = Some(Box::new(stream));
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            let refusal = Refusal::new(
                ErrorCode::TooManyConnections,
                "postgres.max_connections reached; try again later",
            );
            if let Some(io) = io.as_mut() {
                let _ = wire::send(io, &refusal_message(&refusal)).await;
            }
            log.refusal = Some(refusal);
            return self.finish(log).await;
        };
        let handshake = tokio::time::timeout(
            self.handshake_timeout,
            self.handshake(&mut io, &mut log, peer, unix_uid),
        )
        .await;
        let handshaken = match handshake {
            Ok(Ok(handshaken)) => handshaken,
            Ok(Err(Unstarted::Silent)) => return,
            Ok(Err(Unstarted::Refused(refusal))) => {
                if let Some(io) = io.as_mut() {
                    let _ = wire::send(io, &refusal_message(&refusal)).await;
                }
                log.refusal = Some(refusal);
                return self.finish(log).await;
            }
            Err(_) => {
                log.refusal = Some(Refusal::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the handshake did not finish within {} s",
                        self.handshake_timeout.as_secs()
                    ),
                ));
                return self.finish(log).await;
            }
        };
        self.session(handshaken, &mut log).await;
        self.finish(log).await;
    }

    /// Startup, TLS and caller authentication, within the handshake
    /// timeout. `io` is taken over by TLS when the client asks for it.
    async fn handshake(
        &self,
        io: &mut Option<Box<dyn Io>>,
        log: &mut SessionLog,
        peer: Option<SocketAddr>,
        unix_uid: Option<u32>,
    ) -> Result<Handshaken, Unstarted> {
        let mut tls_identity: Option<Result<String, String>> = None;
        let mut secured = false;
        let bad = |text: String| Unstarted::Refused(Refusal::new(ErrorCode::BadRequest, text));
        let (minor, body) = loop {
            let stream = io.as_mut().ok_or(Unstarted::Silent)?;
            let (code, body) = match wire::read_startup(stream).await {
                Ok(packet) => packet,
                Err(ReadError::Length(len)) => {
                    return Err(bad(format!(
                        "a startup packet of {len} bytes (at most {} are accepted)",
                        wire::MAX_STARTUP_LEN
                    )))
                }
                Err(ReadError::Closed | ReadError::Io) => return Err(Unstarted::Silent),
            };
            match code {
                wire::SSL_REQUEST if !secured && body.is_empty() => {
                    let Some(acceptor) = &self.tls else {
                        wire::send(stream, b"N")
                            .await
                            .map_err(|_| Unstarted::Silent)?;
                        continue;
                    };
                    // Bytes sent before the answer would be taken as if
                    // they came through TLS (CVE-2021-23214).
                    let mut early = [0u8; 1];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::ZERO, stream.read(&mut early)).await
                    {
                        if n > 0 {
                            return Err(bad("unencrypted data after the TLS request".to_string()));
                        }
                        return Err(Unstarted::Silent);
                    }
                    wire::send(stream, b"S")
                        .await
                        .map_err(|_| Unstarted::Silent)?;
                    let Some(plain) = io.take() else {
                        return Err(Unstarted::Silent);
                    };
                    let tls = acceptor
                        .accept(plain)
                        .await
                        .map_err(|_| Unstarted::Silent)?;
                    tls_identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| crate::tls::uri_san(leaf));
                    *io = Some(Box::new(tls));
                    secured = true;
                }
                wire::GSSENC_REQUEST if !secured && body.is_empty() => {
                    wire::send(stream, b"N")
                        .await
                        .map_err(|_| Unstarted::Silent)?;
                }
                wire::CANCEL_REQUEST if body.len() == 8 => {
                    let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let secret = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    self.forward_cancel(pid, secret).await;
                    return Err(Unstarted::Silent);
                }
                code if code >> 16 == 3 => break (code & 0xffff, body),
                code => {
                    return Err(bad(format!(
                        "unsupported frontend protocol {}.{} (sealgate speaks 3.0)",
                        code >> 16,
                        code & 0xffff
                    )))
                }
            }
        };
        let stream = io.as_mut().ok_or(Unstarted::Silent)?;
        let parameters = wire::startup_parameters(&body)
            .ok_or_else(|| bad("a malformed startup packet".to_string()))?;
        let mut passed = Vec::new();
        let mut unsupported = Vec::new();
        let (mut user, mut database) = (None, None);
        for (name, value) in parameters {
            match name.as_str() {
                "user" => user = Some(value),
                "database" => database = Some(value),
                n if n.starts_with("_pq_.") => unsupported.push(name),
                n if PASSED_PARAMETERS.contains(&n) => passed.push((name, value)),
                n => {
                    return Err(bad(format!(
                        "the startup parameter \"{}\" is not accepted (sealgate passes on only {})",
                        n.escape_default(),
                        PASSED_PARAMETERS.join(", ")
                    )))
                }
            }
        }
        let Some(user) = user else {
            return Err(bad("the startup packet names no user".to_string()));
        };
        log.client_user = Some(user.clone());
        let database = database.unwrap_or(user);
        if minor > 0 || !unsupported.is_empty() {
            wire::send(stream, &wire::negotiate_protocol_version(&unsupported))
                .await
                .map_err(|_| Unstarted::Silent)?;
        }

        let loopback = peer.is_some_and(|a| a.ip().to_canonical().is_loopback());
        let local = loopback || unix_uid.is_some();
        if !secured && !local {
            return Err(Unstarted::Refused(Refusal::new(
                ErrorCode::TlsRequired,
                "connections from other hosts must use TLS (sslmode=verify-full)",
            )));
        }
        let callers = &log.config.callers;
        let throttle_peer = unix_uid
            .map(Peer::Uid)
            .or(peer.map(|a| Peer::of_ip(a.ip())));
        let throttle = &self.shared.throttle;
        if throttle_peer.is_some_and(|p| throttle.is_blocked(p, Instant::now())) {
            return Err(Unstarted::Refused(Refusal::new(
                ErrorCode::CallerThrottled,
                "too many failed caller identifications from this peer; retry later",
            )));
        }
        let identity = match &tls_identity {
            Some(Ok(identity)) => Some(identity.as_str()),
            Some(Err(why)) => {
                return Err(Unstarted::Refused(Refusal::new(
                    ErrorCode::CallerUnauthenticated,
                    why.clone(),
                )))
            }
            None => None,
        };
        let known_by_connection = identity
            .and_then(|id| callers.by_tls_identity(id))
            .or_else(|| unix_uid.and_then(|uid| callers.by_unix_uid(uid)))
            .is_some();
        let mut token = None;
        if !callers.is_empty() && !known_by_connection && identity.is_none() {
            // A caller token as the password: only where it cannot be
            // read on the way (TLS, loopback, Unix).
            wire::send(stream, &wire::authentication(3))
                .await
                .map_err(|_| Unstarted::Silent)?;
            match wire::read_message(stream, wire::MAX_PASSWORD_LEN).await {
                Ok((b'p', body)) => {
                    let mut body = Zeroizing::new(body);
                    if body.last() == Some(&0) {
                        body.pop();
                    }
                    token = Some(body);
                }
                Ok(_) | Err(ReadError::Length(_)) => {
                    return Err(bad("expected a password message".to_string()))
                }
                Err(_) => return Err(Unstarted::Silent),
            }
        }
        let presented = Presented {
            tls_identity: identity,
            unix_uid,
            token: None,
            password: token.as_deref().map(|t| t.as_slice()),
            local_peer: local,
        };
        match callers.identify(&presented) {
            Identified::Caller(caller) => log.caller = Some(caller),
            Identified::Local => log.local = true,
            Identified::Unauthenticated(why) => {
                if let Some(p) = throttle_peer {
                    throttle.failed(p, Instant::now());
                }
                self.shared
                    .metrics
                    .caller_identification_failures
                    .with_label_values(&["refused"])
                    .inc();
                let why = if token.is_none() && identity.is_none() && unix_uid.is_none() {
                    "no caller identity: send the caller token as the password, or use a client certificate"
                } else {
                    why
                };
                return Err(Unstarted::Refused(Refusal::new(
                    ErrorCode::CallerUnauthenticated,
                    why,
                )));
            }
        }
        let ds = log
            .config
            .datasources
            .get(&database)
            .filter(|ds| ds.protocol == Protocol::Postgres)
            .cloned()
            .ok_or_else(|| {
                Unstarted::Refused(Refusal::new(
                    ErrorCode::UnknownDatasource,
                    format!(
                        "no PostgreSQL data source named \"{}\"",
                        database.escape_default()
                    ),
                ))
            })?;
        log.datasource = Some(ds.clone());
        let admitted = access::admit(&self.shared.metrics, log.caller.as_deref(), &ds)
            .map_err(Unstarted::Refused)?;
        log.credential = admitted.source;
        log.db_user = admitted.credential.and_then(|c| c.username.clone());
        let io = io.take().ok_or(Unstarted::Silent)?;
        Ok(Handshaken {
            io,
            parameters: passed,
        })
    }

    /// Logs in upstream and relays the session.
    async fn session(&self, handshaken: Handshaken, log: &mut SessionLog) {
        let Handshaken { mut io, parameters } = handshaken;
        let Some(ds) = log.datasource.clone() else {
            return;
        };
        let shared = &self.shared;
        // Nothing goes out that the audit trail could not record.
        shared.audit.wait_writable().await;
        let caller = log.caller.as_ref().map(|c| c.name.as_str());
        let credential = ds
            .credential_for(caller)
            .and_then(|(state, _)| state.ready());
        let upstream = match login::open(shared, &log.config, &ds, credential, &parameters).await {
            Ok(upstream) => upstream,
            Err(failure) => {
                if !matches!(failure.kind, "egress") {
                    shared.metrics.count_upstream_error(&ds.name, failure.kind);
                }
                log.upstream = failure.addr;
                log.egress_ip = failure.egress_ip;
                let _ = wire::send(&mut io, &refusal_message(&failure.refusal)).await;
                log.refusal = Some(failure.refusal);
                return;
            }
        };
        log.upstream = Some(upstream.addr);
        log.egress_ip = upstream.egress_ip;
        let registered = upstream.key.and_then(|key| {
            self.cancels.register(cancel::Target {
                datasource: ds.clone(),
                attempt: crate::connect::Attempt {
                    addr: upstream.addr,
                    egress_ip: upstream.egress_ip,
                    limit: 1,
                },
                upstream_key: key,
            })
        });
        let mut hello = wire::authentication(0);
        hello.extend_from_slice(&upstream.greeting);
        if let Some(key) = &registered {
            hello.extend_from_slice(&wire::backend_key_data(key.pid, key.secret));
        }
        wire::message(&mut hello, b'Z', |b| b.extend_from_slice(b"I"));
        if wire::send(&mut io, &hello).await.is_err() {
            log.error = Some("client_closed");
            return;
        }
        let active = shared
            .metrics
            .db
            .active_sessions
            .with_label_values(&[ds.name.as_str()]);
        let _open = OpenSession::new(&self.shared, active);
        let info = tracking::SessionInfo {
            request_id: log.id.as_str().to_string(),
            caller: log.caller_name().map(str::to_string),
            datasource: ds.name.clone(),
            region: ds.region.as_ref().map(|r| r.name.clone()),
            upstream: log.upstream,
            egress_ip: log.egress_ip,
            credential: log.credential,
            client_user: log.client_user.clone(),
            db_user: log.db_user.clone(),
        };
        let audit_statements = log.config.audit.statements == StatementAudit::Fingerprint;
        let tracker = tracking::Tracker::new(shared, &info, audit_statements);
        let stop = self.stop_reason(
            log.caller.clone(),
            ds.clone(),
            log.credential,
            log.config.generation,
        );
        let ended = relay::relay(
            io,
            upstream.io,
            &mut log.tally,
            &tracker,
            &shared.audit,
            stop,
        )
        .await;
        log.statements = tracker.statements.load(Ordering::Relaxed);
        log.error = match ended {
            relay::Ended::Client | relay::Ended::ClientFailed => None,
            relay::Ended::Server if log.tally.terminated => None,
            relay::Ended::Server => {
                shared.metrics.count_upstream_error(&ds.name, "closed");
                Some(ErrorCode::UpstreamUnreachable.as_str())
            }
            relay::Ended::Stopped => Some(ErrorCode::ShuttingDown.as_str()),
            relay::Ended::Malformed => Some(ErrorCode::BadRequest.as_str()),
        };
        drop(registered);
    }

    /// Resolves when the session must end: the drain's grace period is
    /// over, or a reload withdrew its data source, credential or grant.
    /// Each reload is judged once.
    async fn stop_reason(
        &self,
        caller: Option<Arc<Caller>>,
        ds: Arc<DataSource>,
        source: Option<CredentialSource>,
        mut checked: u64,
    ) -> (&'static str, String) {
        let mut ending = self.shared.lifecycle.sessions_end();
        let mut changes = self.shared.config_changes.subscribe();
        loop {
            if *ending.borrow_and_update() {
                return (
                    ErrorCode::ShuttingDown.as_str(),
                    "sealgate is shutting down".into(),
                );
            }
            let config = self.shared.config.load();
            if checked != config.generation {
                checked = config.generation;
                if let Some(why) = withdrawn(&config, caller.as_deref(), &ds, source) {
                    return (ErrorCode::ShuttingDown.as_str(), why);
                }
            }
            tokio::select! {
                _ = ending.changed() => {}
                _ = changes.changed() => {}
            }
        }
    }

    async fn forward_cancel(&self, pid: u32, secret: u32) {
        let Some(target) = self.cancels.find(pid, secret) else {
            tracing::debug!("a cancel request with an unknown key was dropped");
            return;
        };
        if let Err(e) =
            login::cancel(&target.datasource, &target.attempt, target.upstream_key).await
        {
            tracing::warn!(datasource = %target.datasource.name, error = %e, "forwarding a cancel request failed");
        }
    }

    /// The session's one audit record, and its metrics.
    async fn finish(&self, log: SessionLog) {
        let shared = &self.shared;
        let (decision, reason) = access::verdict(log.refusal.as_ref(), log.datasource.as_deref());
        let error = log.refusal.as_ref().map(|r| r.code.as_str()).or(log.error);
        let datasource = log.datasource.as_ref().map(|d| d.name.as_str());
        let caller = log.caller_name();
        let record = AuditRecord {
            ts: SystemTime::now(),
            event: Some("session"),
            request_id: log.id.as_str(),
            caller,
            datasource,
            method: "postgres",
            path: None,
            upstream: log.upstream,
            egress_ip: log.egress_ip,
            region: log.datasource.as_ref().and_then(|d| d.region_name()),
            decision,
            reason,
            status: None,
            request_bytes: log.tally.request_bytes,
            response_bytes: log.tally.response_bytes,
            duration: log.started.elapsed(),
            error,
            protocol: Protocol::Postgres.as_str(),
            credential: log.credential.map(CredentialSource::as_str),
            client_user: log.client_user.as_deref(),
            db_user: log.db_user.as_deref(),
            statements: Some(log.statements),
            statement: None,
        };
        shared.audit.record(&record).await;
        // Data source and caller labels only when they are the config's.
        let ds_label = datasource.unwrap_or(crate::metrics::NO_DATASOURCE);
        let caller_label = caller.unwrap_or("-");
        shared
            .metrics
            .db
            .sessions
            .with_label_values(&[ds_label, caller_label, error.unwrap_or("ok")])
            .inc();
        if let Some(ds) = datasource {
            shared
                .metrics
                .db
                .session_duration
                .with_label_values(&[ds])
                .observe(log.started.elapsed().as_secs_f64());
            shared
                .metrics
                .request_bytes
                .with_label_values(&[ds])
                .inc_by(log.tally.request_bytes);
            shared
                .metrics
                .response_bytes
                .with_label_values(&[ds])
                .inc_by(log.tally.response_bytes);
        }
    }
}

/// Why a reload ends a session, if it does: its data source removed, its
/// credential changed or revoked, or its caller's grant withdrawn.
fn withdrawn(
    config: &Config,
    caller: Option<&Caller>,
    ds: &DataSource,
    source: Option<CredentialSource>,
) -> Option<String> {
    let Some(now) = config
        .datasources
        .get(&ds.name)
        .filter(|d| d.protocol == Protocol::Postgres)
    else {
        return Some(format!("data source \"{}\" was removed", ds.name));
    };
    if let Some(caller) = caller {
        let granted = config
            .callers
            .get(&caller.name)
            .is_some_and(|c| c.may_use(&ds.name));
        if !granted {
            return Some(format!(
                "caller \"{}\" may no longer use data source \"{}\"",
                caller.name, ds.name
            ));
        }
    }
    let name = caller.map(|c| c.name.as_str());
    let login = |d: &DataSource| {
        d.credential_for(name)
            .and_then(|(state, source)| Some((state.ready()?.login()?, source)))
            .map(|((user, password), source)| {
                (user.to_string(), password.expose().to_string(), source)
            })
            .map(|(user, password, source)| (user, Zeroizing::new(password), source))
    };
    let unchanged = match (login(ds), login(now)) {
        (Some(before), Some(after)) => before == after,
        (None, None) => source.is_none(),
        _ => false,
    };
    (!unchanged).then(|| format!("the credential of data source \"{}\" changed", ds.name))
}

/// Counts a session in the drain and in `db_active_sessions` while it lives.
struct OpenSession<'a> {
    shared: &'a Shared,
    active: IntGauge,
}

impl<'a> OpenSession<'a> {
    fn new(shared: &'a Shared, active: IntGauge) -> Self {
        shared
            .lifecycle
            .open_sessions
            .fetch_add(1, Ordering::SeqCst);
        active.inc();
        OpenSession { shared, active }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.shared
            .lifecycle
            .open_sessions
            .fetch_sub(1, Ordering::SeqCst);
        self.active.dec();
    }
}

/// The ErrorResponse for a refusal: FATAL, the code's SQLSTATE, and
/// `sealgate: CODE: TEXT`.
fn refusal_message(refusal: &Refusal) -> BytesMut {
    wire::error_response(
        "FATAL",
        refusal.code.sqlstate(),
        refusal.code.as_str(),
        &refusal.message,
    )
}
