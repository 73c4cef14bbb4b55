//! What every database front does the same way around its own protocol
//! (SPEC sections 9 and 10): identify the caller, choose the data source
//! and credential, count the session in the drain, end it when a reload
//! withdraws its grounds, and leave one session record and statement
//! records with the same fields and metrics. A front brings the bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, IntCounter, IntGauge};
use zeroize::Zeroizing;

use crate::access;
use crate::audit::{AuditRecord, Decision, StatementFields};
use crate::callers::{self, Caller, Identified, Presented};
use crate::config::{Config, CredentialSource, DataSource, DbFront, Protocol};
use crate::connect::LoginFailure;
use crate::errors::{ErrorCode, Refusal};
use crate::metrics::DB_COMMANDS;
use crate::state::{RequestId, Shared, TlsHandles};
use crate::statements::Normalized;
use crate::throttle::Peer;

/// What one session's audit record and metrics are made of.
pub struct SessionLog {
    pub id: RequestId,
    pub protocol: Protocol,
    pub started: Instant,
    pub config: Arc<Config>,
    pub caller: Option<Arc<Caller>>,
    /// No callers are configured and the peer is local.
    pub local: bool,
    pub datasource: Option<Arc<DataSource>>,
    pub client_user: Option<String>,
    pub db_user: Option<String>,
    pub credential: Option<CredentialSource>,
    pub upstream: Option<SocketAddr>,
    pub egress_ip: Option<IpAddr>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub statements: u64,
    pub refusal: Option<Refusal>,
    /// An error code for an ending that is not a refusal.
    pub error: Option<&'static str>,
}

impl SessionLog {
    pub fn new(shared: &Shared, protocol: Protocol) -> SessionLog {
        SessionLog {
            id: shared.next_request_id(),
            protocol,
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
            request_bytes: 0,
            response_bytes: 0,
            statements: 0,
            refusal: None,
            error: None,
        }
    }

    /// The identified caller; `local` for a local peer when no callers are
    /// configured; none when the caller was not identified.
    pub fn caller_name(&self) -> Option<&str> {
        match (&self.caller, self.local) {
            (Some(c), _) => Some(c.name.as_str()),
            (None, true) => Some(callers::LOCAL),
            (None, false) => None,
        }
    }

    /// Who the session's statements belong to.
    pub fn info(&self) -> Option<SessionInfo> {
        let ds = self.datasource.as_ref()?;
        Some(SessionInfo {
            request_id: self.id.as_str().to_string(),
            protocol: self.protocol,
            caller: self.caller_name().map(str::to_string),
            datasource: ds.name.clone(),
            region: ds.region.as_ref().map(|r| r.name.clone()),
            upstream: self.upstream,
            egress_ip: self.egress_ip,
            credential: self.credential,
            client_user: self.client_user.clone(),
            db_user: self.db_user.clone(),
        })
    }
}

/// What every database front holds besides its protocol: TLS inside the
/// protocol, the handshake deadline and the connection limit.
pub struct FrontBase {
    pub shared: Arc<Shared>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    permits: Arc<tokio::sync::Semaphore>,
    /// The front's config section, named in its refusals.
    section: &'static str,
}

impl FrontBase {
    pub fn new(
        shared: &Arc<Shared>,
        front: &DbFront,
        tls: Option<&TlsHandles>,
        section: &'static str,
    ) -> Result<FrontBase, String> {
        let tls = match tls {
            None => None,
            Some(handles) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::in_protocol_server_config(
                    handles.cert.clone(),
                    handles.client.clone(),
                )?,
            )),
        };
        Ok(FrontBase {
            shared: shared.clone(),
            tls,
            handshake_timeout: front.handshake_timeout,
            permits: Arc::new(tokio::sync::Semaphore::new(front.max_connections)),
            section,
        })
    }

    /// A connection's slot, held while it lives, or the refusal once
    /// `max_connections` are open.
    pub fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            Refusal::new(
                ErrorCode::TooManyConnections,
                format!("{}.max_connections reached; try again later", self.section),
            )
        })
    }

    /// Runs a handshake within `handshake_timeout_s`; over it, the refusal.
    pub async fn within_deadline<T>(
        &self,
        handshake: impl std::future::Future<Output = T>,
    ) -> Result<T, Refusal> {
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                Refusal::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the handshake did not finish within {} s",
                        self.handshake_timeout.as_secs()
                    ),
                )
            })
    }
}

/// The TCP peer of a connection pingora accepted (none on a Unix socket).
pub fn peer_addr(stream: &pingora::protocols::Stream) -> Option<SocketAddr> {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().cloned())
        .and_then(|a| a.as_inet().copied())
}

/// What a front's relay counts for the session's audit record.
#[derive(Default)]
pub struct Tally {
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The client said goodbye (Terminate, COM_QUIT): the server closing
    /// next is no failure.
    pub goodbye: bool,
}

/// How a front's relay ended.
pub enum Ended {
    /// The client closed (after its goodbye or not).
    Client,
    /// The client connection failed.
    ClientFailed,
    /// The server closed the connection, or it failed.
    Server,
    /// Told to stop (drain over, or a reload withdrew the session's
    /// grounds): the client was told so.
    Stopped,
    /// The client broke the protocol or sent what sealgate refuses; the
    /// code is the audit's.
    Refused(&'static str),
    /// The server did what the session does not allow (a file request
    /// without `local_infile`); the client was sent an error instead.
    ServerRefused,
}

impl SessionLog {
    /// The credential the session logs in with: the caller's own, else
    /// the data source's (as `choose` admitted it).
    pub fn login_credential(&self) -> Option<&crate::credentials::Credential> {
        let caller = self.caller.as_ref().map(|c| c.name.as_str());
        self.datasource
            .as_ref()?
            .credential_for(caller)
            .and_then(|(state, _)| state.ready())
    }

    /// A failed upstream login, recorded and counted (an egress refusal
    /// was counted where it was made); returns the refusal for the client.
    pub fn login_failed(&mut self, shared: &Shared, failure: LoginFailure) -> &Refusal {
        if failure.kind != "egress" {
            let ds = self.datasource.as_ref().map_or("-", |d| d.name.as_str());
            shared.metrics.count_upstream_error(ds, failure.kind);
        }
        self.upstream = failure.addr;
        self.egress_ip = failure.egress_ip;
        self.refusal.insert(failure.refusal)
    }

    /// What the relay counted, and the error its ending means; an upstream
    /// that failed is counted.
    pub fn relayed(&mut self, shared: &Shared, tally: Tally, statements: u64, ended: Ended) {
        self.statements = statements;
        self.request_bytes = tally.request_bytes;
        self.response_bytes = tally.response_bytes;
        let ds = self.datasource.as_ref().map_or("-", |d| d.name.as_str());
        self.error = match ended {
            Ended::Client | Ended::ClientFailed => None,
            Ended::Server if tally.goodbye => None,
            Ended::Server => {
                shared.metrics.count_upstream_error(ds, "closed");
                Some(ErrorCode::UpstreamUnreachable.as_str())
            }
            Ended::Stopped => Some(ErrorCode::ShuttingDown.as_str()),
            Ended::Refused(code) => Some(code),
            Ended::ServerRefused => {
                shared.metrics.count_upstream_error(ds, "protocol");
                Some(ErrorCode::BadRequest.as_str())
            }
        };
    }
}

/// How a client connected, as far as identifying it goes.
pub struct ClientPeer {
    pub addr: Option<SocketAddr>,
    pub unix_uid: Option<u32>,
    /// The URI SAN of a verified client certificate, or why it has none
    /// usable.
    pub tls_identity: Option<Result<String, String>>,
    pub secured: bool,
}

impl ClientPeer {
    /// Loopback or a Unix socket: where a token cannot be read on the way.
    pub fn local(&self) -> bool {
        self.unix_uid.is_some()
            || self
                .addr
                .is_some_and(|a| a.ip().to_canonical().is_loopback())
    }

    /// Whether the caller must send a token: callers are configured and
    /// the connection itself names none.
    pub fn needs_token(&self, config: &Config) -> bool {
        let callers = &config.callers;
        let identity = self.tls_identity.as_ref().and_then(|r| r.as_deref().ok());
        let known = identity
            .and_then(|id| callers.by_tls_identity(id))
            .or_else(|| self.unix_uid.and_then(|uid| callers.by_unix_uid(uid)))
            .is_some();
        !callers.is_empty() && !known && self.tls_identity.is_none()
    }

    fn throttle_key(&self) -> Option<Peer> {
        self.unix_uid
            .map(Peer::Uid)
            .or(self.addr.map(|a| Peer::of_ip(a.ip())))
    }

    /// Refuses a peer that failed to identify itself too often lately, and
    /// a plaintext connection from another host.
    pub fn admissible(&self, shared: &Shared, tls_hint: &str) -> Result<(), Refusal> {
        if !self.secured && !self.local() {
            return Err(Refusal::new(
                ErrorCode::TlsRequired,
                format!("connections from other hosts must use TLS ({tls_hint})"),
            ));
        }
        if self
            .throttle_key()
            .is_some_and(|p| shared.throttle.is_blocked(p, Instant::now()))
        {
            return Err(Refusal::new(
                ErrorCode::CallerThrottled,
                "too many failed caller identifications from this peer; retry later",
            ));
        }
        Ok(())
    }

    /// Identifies the caller (SPEC section 8) into `log`; a failure counts
    /// towards the peer's throttle.
    pub fn identify(
        &self,
        shared: &Shared,
        log: &mut SessionLog,
        token: Option<&[u8]>,
        how_to: &str,
    ) -> Result<(), Refusal> {
        let identity = match &self.tls_identity {
            Some(Ok(identity)) => Some(identity.as_str()),
            Some(Err(why)) => {
                return Err(Refusal::new(ErrorCode::CallerUnauthenticated, why.clone()))
            }
            None => None,
        };
        let presented = Presented {
            tls_identity: identity,
            unix_uid: self.unix_uid,
            token: None,
            password: token,
            local_peer: self.local(),
        };
        match log.config.callers.identify(&presented) {
            Identified::Caller(caller) => log.caller = Some(caller),
            Identified::Local => log.local = true,
            Identified::Unauthenticated(why) => {
                if let Some(p) = self.throttle_key() {
                    shared.throttle.failed(p, Instant::now());
                }
                shared
                    .metrics
                    .caller_identification_failures
                    .with_label_values(&["refused"])
                    .inc();
                let why = if token.is_none() && identity.is_none() && self.unix_uid.is_none() {
                    how_to
                } else {
                    why
                };
                return Err(Refusal::new(ErrorCode::CallerUnauthenticated, why));
            }
        }
        Ok(())
    }
}

/// The data source the client named, if it is one of this protocol, and
/// whether the caller may use it: into `log`.
pub fn choose(
    shared: &Shared,
    log: &mut SessionLog,
    database: &str,
    kind: &str,
) -> Result<(), Refusal> {
    let ds = log
        .config
        .datasources
        .get(database)
        .filter(|ds| ds.protocol == log.protocol)
        .cloned()
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::UnknownDatasource,
                format!(
                    "no {kind} data source named \"{}\"",
                    database.escape_default()
                ),
            )
        })?;
    log.datasource = Some(ds.clone());
    let admitted = access::admit(&shared.metrics, log.caller.as_deref(), &ds)?;
    log.credential = admitted.source;
    log.db_user = admitted.credential.and_then(|c| c.username.clone());
    Ok(())
}

/// Resolves when the session must end: the drain's grace period is over,
/// a reload withdrew its data source, credential or grant, or its grant's
/// `not_after` passed. Each reload is judged once.
pub async fn stop_reason(
    shared: &Shared,
    caller: Option<Arc<Caller>>,
    ds: Arc<DataSource>,
    source: Option<CredentialSource>,
    mut checked: u64,
) -> (&'static str, String) {
    let mut ending = shared.lifecycle.sessions_end();
    let mut changes = shared.config_changes.subscribe();
    loop {
        if *ending.borrow_and_update() {
            return (
                ErrorCode::ShuttingDown.as_str(),
                "sealgate is shutting down".into(),
            );
        }
        let config = shared.config.load();
        if checked != config.generation {
            checked = config.generation;
            if let Some(why) = withdrawn(&config, caller.as_deref(), &ds, source) {
                return (ErrorCode::ShuttingDown.as_str(), why);
            }
        }
        let grant = caller.as_ref().and_then(|c| config.callers.get(&c.name));
        let expiry = grant.and_then(|c| c.grant_expiry(&ds.name));
        if let (Some(grant), Some(_)) = (grant, expiry) {
            let access = grant.access(&ds.name, SystemTime::now());
            if let Some(why) = access.refusal(&grant.name, &ds.name) {
                return (ErrorCode::ShuttingDown.as_str(), why);
            }
        }
        // Woken at the grant's end, and at least once a second meanwhile
        // so a step of the wall clock is noticed.
        let until_expiry = expiry.map(|at| {
            (UNIX_EPOCH + Duration::from_secs(at))
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(Duration::from_secs(1))
                + Duration::from_millis(1)
        });
        tokio::select! {
            _ = ending.changed() => {}
            _ = changes.changed() => {}
            _ = tokio::time::sleep(until_expiry.unwrap_or_default()), if until_expiry.is_some() => {}
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
        .filter(|d| d.protocol == ds.protocol)
    else {
        return Some(format!("data source \"{}\" was removed", ds.name));
    };
    if let Some(caller) = caller {
        let granted = config
            .callers
            .get(&caller.name)
            .is_some_and(|c| c.grants(&ds.name));
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
                (
                    user.to_string(),
                    Zeroizing::new(password.expose().to_string()),
                    source,
                )
            })
    };
    let unchanged = match (login(ds), login(now)) {
        (Some(before), Some(after)) => before == after,
        (None, None) => source.is_none(),
        _ => false,
    };
    (!unchanged).then(|| format!("the credential of data source \"{}\" changed", ds.name))
}

/// Counts a session in the drain and in `db_active_sessions` while it lives.
pub struct OpenSession<'a> {
    shared: &'a Shared,
    active: IntGauge,
}

impl<'a> OpenSession<'a> {
    pub fn new(shared: &'a Shared, datasource: &str) -> Self {
        let active = shared
            .metrics
            .db
            .active_sessions
            .with_label_values(&[datasource]);
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

/// The session's one audit record, and its metrics.
pub async fn finish(shared: &Shared, log: SessionLog) {
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
        method: log.protocol.as_str(),
        path: None,
        upstream: log.upstream,
        egress_ip: log.egress_ip,
        region: log.datasource.as_ref().and_then(|d| d.region_name()),
        decision,
        reason,
        status: None,
        request_bytes: log.request_bytes,
        response_bytes: log.response_bytes,
        duration: log.started.elapsed(),
        error,
        protocol: log.protocol.as_str(),
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
    let metrics = &shared.metrics;
    metrics
        .db
        .sessions
        .with_label_values(&[ds_label, caller_label, error.unwrap_or("ok")])
        .inc();
    if let Some(ds) = datasource {
        metrics
            .db
            .session_duration
            .with_label_values(&[ds])
            .observe(log.started.elapsed().as_secs_f64());
        metrics
            .request_bytes
            .with_label_values(&[ds])
            .inc_by(log.request_bytes);
        metrics
            .response_bytes
            .with_label_values(&[ds])
            .inc_by(log.response_bytes);
    }
}

/// Who a session's statements belong to, for their audit records.
pub struct SessionInfo {
    pub request_id: String,
    pub protocol: Protocol,
    pub caller: Option<String>,
    pub datasource: String,
    pub region: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub egress_ip: Option<IpAddr>,
    pub credential: Option<CredentialSource>,
    pub client_user: Option<String>,
    pub db_user: Option<String>,
}

/// One finished statement, as a front saw it.
pub struct Finished<'a> {
    pub text: Option<&'a Normalized>,
    /// The statement's verb (a completion tag's, or the text's first word).
    pub verb: Option<&'a str>,
    pub rows: Option<u64>,
    /// Set when the statement failed: then no command is recorded.
    pub sqlstate: Option<&'a str>,
    pub took: Duration,
}

/// Statement metrics and records of one session: the data source's series
/// looked up once per session and per command, not at every statement.
pub struct StatementLog<'a> {
    shared: &'a Shared,
    pub session: SessionInfo,
    duration: Histogram,
    by_command: [OnceLock<IntCounter>; DB_COMMANDS.len() + 1],
    /// `[audit] statements = "fingerprint"`.
    pub audit: bool,
}

impl<'a> StatementLog<'a> {
    pub fn new(shared: &'a Shared, session: SessionInfo, audit: bool) -> Self {
        StatementLog {
            duration: shared
                .metrics
                .db
                .statement_duration
                .with_label_values(&[session.datasource.as_str()]),
            by_command: std::array::from_fn(|_| OnceLock::new()),
            shared,
            session,
            audit,
        }
    }

    /// Counts the statement; returns its audit record when it has text.
    pub fn finished(&self, done: &Finished<'_>) -> Option<Vec<u8>> {
        let command = if done.sqlstate.is_some() {
            None
        } else {
            let verb = done.verb.unwrap_or("");
            let index = DB_COMMANDS
                .iter()
                .position(|c| c.eq_ignore_ascii_case(verb))
                .unwrap_or(DB_COMMANDS.len());
            self.by_command[index]
                .get_or_init(|| {
                    self.shared.metrics.db.statements.with_label_values(&[
                        self.session.datasource.as_str(),
                        DB_COMMANDS.get(index).copied().unwrap_or("OTHER"),
                    ])
                })
                .inc();
            self.duration.observe(done.took.as_secs_f64());
            Some(DB_COMMANDS.get(index).copied().unwrap_or("OTHER"))
        };
        let text = done.text?;
        let s = &self.session;
        Some(crate::audit::encode(&AuditRecord {
            ts: SystemTime::now(),
            event: Some("statement"),
            request_id: &s.request_id,
            caller: s.caller.as_deref(),
            datasource: Some(&s.datasource),
            method: s.protocol.as_str(),
            path: None,
            upstream: s.upstream,
            egress_ip: s.egress_ip,
            region: s.region.as_deref(),
            decision: Decision::Allow,
            reason: None,
            status: None,
            request_bytes: 0,
            response_bytes: 0,
            duration: done.took,
            error: None,
            protocol: s.protocol.as_str(),
            credential: s.credential.map(CredentialSource::as_str),
            client_user: s.client_user.as_deref(),
            db_user: s.db_user.as_deref(),
            statements: None,
            statement: Some(StatementFields {
                command,
                rows: done.rows,
                sqlstate: done.sqlstate,
                text: &text.text,
                fingerprint: &text.fingerprint,
            }),
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::LazyLock;

    static SHARED: LazyLock<Arc<Shared>> = LazyLock::new(crate::state::tests::shared);

    /// A statement log with statement audit on, for the trackers' tests.
    pub(crate) fn statement_log(protocol: Protocol) -> StatementLog<'static> {
        StatementLog::new(&SHARED, session(protocol), true)
    }

    /// Every statement record is a JSON line and none shows `secret`.
    pub(crate) fn records_hide(
        records: &[Vec<u8>],
        secret: &str,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        for record in records {
            let text = String::from_utf8_lossy(record);
            proptest::prop_assert!(
                serde_json::from_str::<serde_json::Value>(text.trim_end()).is_ok(),
                "{}",
                text
            );
            proptest::prop_assert!(!text.contains(secret), "{}", text);
        }
        Ok(())
    }

    /// What a statement log needs of a session.
    fn session(protocol: Protocol) -> SessionInfo {
        SessionInfo {
            request_id: "0000000000000001".into(),
            protocol,
            caller: Some("app".into()),
            datasource: "a".into(),
            region: None,
            upstream: None,
            egress_ip: None,
            credential: None,
            client_user: Some("app".into()),
            db_user: Some("db".into()),
        }
    }
}
