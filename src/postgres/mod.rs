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
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use zeroize::Zeroizing;

use crate::config::{Protocol, StatementAudit};
use crate::errors::{ErrorCode, Refusal};
use crate::sessions::{self, ClientPeer, FrontBase, OpenSession, SessionLog, StatementLog, Tally};
use crate::state::Shared;
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
    base: FrontBase,
    cancels: cancel::CancelKeys,
}

impl PostgresFront {
    pub fn new(shared: Arc<Shared>) -> Result<Option<PostgresFront>, String> {
        let config = shared.config.load();
        let Some(front) = &config.postgres else {
            return Ok(None);
        };
        let base = FrontBase::new(&shared, front, shared.postgres_tls.as_ref(), "postgres")?;
        Ok(Some(PostgresFront {
            inner: Arc::new(Inner {
                base,
                cancels: cancel::CancelKeys::default(),
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
        let shared = &self.base.shared;
        let peer = sessions::peer_addr(&stream);
        let unix_uid = crate::unix_listener::peer_uid();
        let mut log = SessionLog::new(shared, Protocol::Postgres);
        let mut io: Option<Box<dyn Io>> = Some(Box::new(stream));
        let refused = match self.base.permit() {
            Err(refusal) => Some(refusal),
            Ok(_permit) => {
                let handshake = self.handshake(&mut io, &mut log, peer, unix_uid);
                match self.base.within_deadline(handshake).await {
                    Ok(Ok(handshaken)) => {
                        self.session(handshaken, &mut log).await;
                        None
                    }
                    Ok(Err(Unstarted::Silent)) => return,
                    Ok(Err(Unstarted::Refused(refusal))) => Some(refusal),
                    // A client that stalled is not answered.
                    Err(overdue) => {
                        io = None;
                        Some(overdue)
                    }
                }
            }
        };
        if let Some(refusal) = refused {
            if let Some(io) = io.as_mut() {
                let _ = wire::send(io, &refusal_message(&refusal)).await;
            }
            log.refusal = Some(refusal);
        }
        sessions::finish(&self.base.shared, log).await;
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
                    let Some(acceptor) = &self.base.tls else {
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

        let client = ClientPeer {
            addr: peer,
            unix_uid,
            tls_identity,
            secured,
        };
        client
            .admissible(&self.base.shared, "sslmode=verify-full")
            .map_err(Unstarted::Refused)?;
        let mut token = None;
        if client.needs_token(&log.config) {
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
        client
            .identify(
                &self.base.shared,
                log,
                token.as_deref().map(|t| t.as_slice()),
                "no caller identity: send the caller token as the password, or use a client certificate",
            )
            .map_err(Unstarted::Refused)?;
        sessions::choose(&self.base.shared, log, &database, "PostgreSQL")
            .map_err(Unstarted::Refused)?;
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
        let shared = &self.base.shared;
        // Nothing goes out that the audit trail could not record.
        shared.audit.wait_writable().await;
        let upstream = match login::open(
            shared,
            &log.config,
            &ds,
            log.login_credential(),
            &parameters,
        )
        .await
        {
            Ok(upstream) => upstream,
            Err(failure) => {
                let refusal = log.login_failed(shared, failure);
                let _ = wire::send(&mut io, &refusal_message(refusal)).await;
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
        let _open = OpenSession::new(&self.base.shared, &ds.name);
        let Some(info) = log.info() else {
            return;
        };
        let audit_statements = log.config.audit.statements == StatementAudit::Fingerprint;
        let tracker = tracking::Tracker::new(StatementLog::new(shared, info, audit_statements));
        let stop = sessions::stop_reason(
            shared,
            log.caller.clone(),
            ds.clone(),
            log.credential,
            log.config.generation,
        );
        let mut tally = Tally::default();
        let ended = relay::relay(io, upstream.io, &mut tally, &tracker, &shared.audit, stop).await;
        log.relayed(
            shared,
            tally,
            tracker.statements.load(Ordering::Relaxed),
            ended,
        );
        drop(registered);
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
