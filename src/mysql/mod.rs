//! The MySQL / MariaDB front (SPEC section 10): an app connects with any
//! MySQL client and no database password; sealgate greets it, identifies
//! the caller, picks the data source named by the handshake's database,
//! logs in upstream with the sealed password over verified TLS, and
//! relays the session. Served by pingora like the other fronts.
//!
//! sealgate greets before it knows the server, so it announces only what
//! it relays correctly with any supported server: no compression, no
//! query attributes, no optional metadata, no `CLIENT_DEPRECATE_EOF`
//! (EOF packets mark where responses end, which the relay follows).

mod login;
mod relay;
mod tracking;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse};
use mysql_common::proto::MySerialize;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::config::{Protocol, StatementAudit};
use crate::errors::{ErrorCode, Refusal};
use crate::sessions::{self, ClientPeer, FrontBase, OpenSession, SessionLog, StatementLog, Tally};
use crate::state::Shared;
use wire::ReadError;

/// A byte stream either leg may be: TCP, Unix, or TLS over either.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// What sealgate's greeting announces: the common ground of MySQL 5.7+,
/// 8.x and MariaDB 10.x; clients that switch behaviour on versions take
/// the 5.7 dialect every supported server speaks.
const SERVER_VERSION: &str = "5.7.99-sealgate";
/// utf8mb4_general_ci, known to every supported server.
const DEFAULT_COLLATION: u8 = 45;
/// A caller token sent through `mysql_clear_password`; tokens are short.
const MAX_TOKEN_PACKET: usize = 1024;

/// The capabilities sealgate relays (`CLIENT_SSL` is added when
/// `[mysql.tls]` is set).
const RELAYED: CapabilityFlags = CapabilityFlags::CLIENT_LONG_PASSWORD
    .union(CapabilityFlags::CLIENT_FOUND_ROWS)
    .union(CapabilityFlags::CLIENT_LONG_FLAG)
    .union(CapabilityFlags::CLIENT_CONNECT_WITH_DB)
    .union(CapabilityFlags::CLIENT_NO_SCHEMA)
    .union(CapabilityFlags::CLIENT_ODBC)
    .union(CapabilityFlags::CLIENT_LOCAL_FILES)
    .union(CapabilityFlags::CLIENT_IGNORE_SPACE)
    .union(CapabilityFlags::CLIENT_PROTOCOL_41)
    .union(CapabilityFlags::CLIENT_INTERACTIVE)
    .union(CapabilityFlags::CLIENT_IGNORE_SIGPIPE)
    .union(CapabilityFlags::CLIENT_TRANSACTIONS)
    .union(CapabilityFlags::CLIENT_SECURE_CONNECTION)
    .union(CapabilityFlags::CLIENT_MULTI_STATEMENTS)
    .union(CapabilityFlags::CLIENT_MULTI_RESULTS)
    .union(CapabilityFlags::CLIENT_PS_MULTI_RESULTS)
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH)
    .union(CapabilityFlags::CLIENT_CONNECT_ATTRS)
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
    .union(CapabilityFlags::CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS)
    .union(CapabilityFlags::CLIENT_SESSION_TRACK);

/// The front, shared by its TCP and Unix listeners.
#[derive(Clone)]
pub struct MysqlFront {
    inner: Arc<Inner>,
}

struct Inner {
    base: FrontBase,
    /// Connection ids in greetings (the server's own stay upstream).
    connection_ids: AtomicU32,
}

impl MysqlFront {
    pub fn new(shared: Arc<Shared>) -> Result<Option<MysqlFront>, String> {
        let config = shared.config.load();
        let Some(front) = &config.mysql else {
            return Ok(None);
        };
        let base = FrontBase::new(&shared, front, shared.mysql_tls.as_ref(), "mysql")?;
        Ok(Some(MysqlFront {
            inner: Arc::new(Inner {
                base,
                connection_ids: AtomicU32::new(1),
            }),
        }))
    }
}

#[async_trait]
impl ServerApp for MysqlFront {
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
    /// Refused: the client is sent the ERR packet with this sequence id
    /// (unless its connection is gone, as after a failed TLS handshake).
    Refused(Refusal, u8),
    /// Nothing to answer: the client went away.
    Silent,
}

/// A client that finished the handshake: who it is and where it goes.
struct Handshaken {
    io: Box<dyn Io>,
    hello: login::ClientHello,
    /// The sequence id of sealgate's next packet to the client.
    seq: u8,
}

fn refusal_packet(refusal: &Refusal, seq: u8) -> Vec<u8> {
    let (number, sqlstate) = refusal.code.mysql();
    wire::err_packet(
        seq,
        number,
        sqlstate,
        refusal.code.as_str(),
        &refusal.message,
    )
}

/// A nonce for the greeting and auth switch: 20 bytes, none of them 0
/// (clients read the second part as NUL-terminated).
fn nonce() -> Result<[u8; 20], Unstarted> {
    let mut nonce = [0u8; 20];
    getrandom::getrandom(&mut nonce).map_err(|_| Unstarted::Silent)?;
    for b in &mut nonce {
        *b = 1 + *b % 127;
    }
    Ok(nonce)
}

impl Inner {
    async fn serve(self: &Arc<Self>, stream: Stream) {
        let shared = &self.base.shared;
        let peer = sessions::peer_addr(&stream);
        let unix_uid = crate::unix_listener::peer_uid();
        let mut log = SessionLog::new(shared, Protocol::Mysql);
        let mut io: Option<Box<dyn Io>> = Some(Box::new(stream));
        let refused = match self.base.permit() {
            // Sent instead of the greeting, as a full server does.
            Err(refusal) => Some((refusal, 0)),
            Ok(_permit) => {
                let handshake = self.handshake(&mut io, &mut log, peer, unix_uid);
                match self.base.within_deadline(handshake).await {
                    Ok(Ok(handshaken)) => {
                        self.session(handshaken, &mut log).await;
                        None
                    }
                    Ok(Err(Unstarted::Silent)) => return,
                    Ok(Err(Unstarted::Refused(refusal, seq))) => Some((refusal, seq)),
                    // A client that stalled is not answered.
                    Err(overdue) => {
                        io = None;
                        Some((overdue, 0))
                    }
                }
            }
        };
        if let Some((refusal, seq)) = refused {
            if let Some(io) = io.as_mut() {
                let _ = wire::send(io, &refusal_packet(&refusal, seq)).await;
            }
            log.refusal = Some(refusal);
        }
        sessions::finish(shared, log).await;
    }

    /// Greeting, TLS, handshake response and caller authentication, within
    /// the handshake timeout. `io` is taken over by TLS when the client
    /// asks for it.
    async fn handshake(
        &self,
        io: &mut Option<Box<dyn Io>>,
        log: &mut SessionLog,
        peer: Option<SocketAddr>,
        unix_uid: Option<u32>,
    ) -> Result<Handshaken, Unstarted> {
        let nonce = nonce()?;
        let mut offered = RELAYED;
        offered.set(CapabilityFlags::CLIENT_SSL, self.base.tls.is_some());
        let scramble_2 = [&nonce[8..], &[0][..]].concat();
        let greeting = HandshakePacket::new(
            10,
            SERVER_VERSION.as_bytes(),
            self.connection_ids.fetch_add(1, Ordering::Relaxed),
            nonce[..8].try_into().unwrap_or_default(),
            Some(&scramble_2[..]),
            offered,
            DEFAULT_COLLATION,
            StatusFlags::SERVER_STATUS_AUTOCOMMIT,
            Some(AuthPlugin::MysqlNativePassword.as_bytes()),
        );
        let mut payload = Vec::new();
        greeting.serialize(&mut payload);
        let mut out = Vec::new();
        wire::packet(&mut out, 0, &payload);
        let stream = io.as_mut().ok_or(Unstarted::Silent)?;
        wire::send(stream, &out)
            .await
            .map_err(|_| Unstarted::Silent)?;

        let bad = |text: &str, seq: u8| {
            Unstarted::Refused(Refusal::new(ErrorCode::BadRequest, text.to_string()), seq)
        };
        let mut seq = 1u8;
        let mut tls_identity = None;
        let mut secured = false;
        let response = loop {
            let stream = io.as_mut().ok_or(Unstarted::Silent)?;
            let (got, payload) = match wire::read_packet(stream, wire::MAX_HANDSHAKE_PACKET).await {
                Ok(packet) => packet,
                Err(ReadError::Length(len)) => {
                    return Err(bad(
                        &format!(
                            "a handshake packet of {len} bytes (at most {} are accepted)",
                            wire::MAX_HANDSHAKE_PACKET
                        ),
                        seq,
                    ))
                }
                Err(ReadError::Closed | ReadError::Io) => return Err(Unstarted::Silent),
            };
            if got != seq {
                return Err(bad(
                    "a handshake packet out of sequence",
                    got.wrapping_add(1),
                ));
            }
            seq = seq.wrapping_add(1);
            let flags = payload.get(..4).map(|f| {
                CapabilityFlags::from_bits_truncate(u32::from_le_bytes([f[0], f[1], f[2], f[3]]))
            });
            let ssl_request = payload.len() == 32
                && flags.is_some_and(|f| f.contains(CapabilityFlags::CLIENT_SSL));
            if !ssl_request {
                // It may carry the caller token (mysql_clear_password).
                break Zeroizing::new(payload);
            }
            let (Some(acceptor), false) = (&self.base.tls, secured) else {
                return Err(bad("an unexpected TLS request", seq));
            };
            // The client starts TLS right after its request (MySQL has no
            // answer to wait for), so anything but a TLS handshake fails
            // here: the connection is closed and the attempt audited.
            let Some(plain) = io.take() else {
                return Err(Unstarted::Silent);
            };
            let tls = acceptor.accept(plain).await.map_err(|e| {
                Unstarted::Refused(
                    Refusal::new(
                        ErrorCode::BadRequest,
                        format!("TLS after the TLS request failed: {e}"),
                    ),
                    seq,
                )
            })?;
            tls_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| crate::tls::uri_san(leaf));
            *io = Some(Box::new(tls));
            secured = true;
        };
        let hello = read_hello(&response).map_err(|text| bad(text, seq))?;
        let client_capabilities = hello.capabilities();
        log.client_user = Some(String::from_utf8_lossy(hello.user()).into_owned());
        let database = hello
            .db_name()
            .filter(|d| !d.is_empty())
            .map(|d| String::from_utf8_lossy(d).into_owned());
        let client = ClientPeer {
            addr: peer,
            unix_uid,
            tls_identity,
            secured,
        };
        client
            .admissible(&self.base.shared, "--ssl-mode=VERIFY_IDENTITY")
            .map_err(|r| Unstarted::Refused(r, seq))?;
        let mut token = None;
        if client.needs_token(&log.config) {
            let sent_clear = hello.auth_plugin() == Some(&AuthPlugin::MysqlClearPassword);
            let mut data = if sent_clear {
                Zeroizing::new(hello.scramble_buf().to_vec())
            } else {
                // The token is asked for in clear text: only where it
                // cannot be read on the way (TLS, loopback, Unix).
                let switch =
                    AuthSwitchRequest::new(AuthPlugin::MysqlClearPassword.as_bytes(), &nonce[..]);
                let mut payload = Vec::new();
                switch.serialize(&mut payload);
                let mut out = Vec::new();
                wire::packet(&mut out, seq, &payload);
                let stream = io.as_mut().ok_or(Unstarted::Silent)?;
                wire::send(stream, &out)
                    .await
                    .map_err(|_| Unstarted::Silent)?;
                seq = seq.wrapping_add(1);
                match wire::read_packet(stream, MAX_TOKEN_PACKET).await {
                    Ok((got, payload)) if got == seq => {
                        seq = seq.wrapping_add(1);
                        Zeroizing::new(payload)
                    }
                    Ok((got, _)) => {
                        return Err(bad("an auth packet out of sequence", got.wrapping_add(1)))
                    }
                    Err(ReadError::Length(_)) => return Err(bad("an oversized auth packet", seq)),
                    Err(_) => return Err(Unstarted::Silent),
                }
            };
            if data.last() == Some(&0) {
                data.pop();
            }
            token = Some(data);
        }
        client
            .identify(
                &self.base.shared,
                log,
                token.as_deref().map(|t| t.as_slice()),
                "no caller identity: send the caller token as the password (mysql_clear_password), or use a client certificate",
            )
            .map_err(|r| Unstarted::Refused(r, seq))?;
        let Some(database) = database else {
            return Err(Unstarted::Refused(
                Refusal::new(
                    ErrorCode::UnknownDatasource,
                    "the handshake names no database: name the data source as the database",
                ),
                seq,
            ));
        };
        sessions::choose(&self.base.shared, log, &database, "MySQL")
            .map_err(|r| Unstarted::Refused(r, seq))?;
        let io = io.take().ok_or(Unstarted::Silent)?;
        Ok(Handshaken {
            io,
            hello: login::ClientHello {
                capabilities: client_capabilities & offered,
                max_packet_size: response
                    .get(4..8)
                    .map_or(0, |m| u32::from_le_bytes([m[0], m[1], m[2], m[3]])),
                collation: hello.collation(),
                attributes: hello.connect_attributes(),
            },
            seq,
        })
    }

    /// Logs in upstream and relays the session.
    async fn session(&self, handshaken: Handshaken, log: &mut SessionLog) {
        let Handshaken { mut io, hello, seq } = handshaken;
        let Some(ds) = log.datasource.clone() else {
            return;
        };
        let shared = &self.base.shared;
        // Nothing goes out that the audit trail could not record.
        shared.audit.wait_writable().await;
        let upstream =
            match login::open(shared, &log.config, &ds, log.login_credential(), &hello).await {
                Ok(upstream) => upstream,
                Err(failure) => {
                    let refusal = log.login_failed(shared, failure);
                    let _ = wire::send(&mut io, &refusal_packet(refusal, seq)).await;
                    return;
                }
            };
        log.upstream = Some(upstream.addr);
        log.egress_ip = upstream.egress_ip;
        let mut ok = Vec::new();
        wire::packet(&mut ok, seq, &upstream.ok);
        if wire::send(&mut io, &ok).await.is_err() {
            log.error = Some("client_closed");
            return;
        }
        let _open = OpenSession::new(shared, &ds.name);
        let Some(info) = log.info() else {
            return;
        };
        let audit_statements = log.config.audit.statements == StatementAudit::Fingerprint;
        let tracker = tracking::Tracker::new(
            StatementLog::new(shared, info, audit_statements),
            ds.local_infile,
        );
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
    }
}

/// The client's HandshakeResponse41, or why it is refused: bytes from a
/// caller not yet identified.
fn read_hello(response: &[u8]) -> Result<HandshakeResponse<'_>, &'static str> {
    let hello: HandshakeResponse<'_> = ParseBuf(response)
        .parse(())
        .map_err(|_| "a malformed handshake response")?;
    if !hello
        .capabilities()
        .contains(CapabilityFlags::CLIENT_PROTOCOL_41)
    {
        return Err("a client of the pre-4.1 protocol");
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A handshake response as the mariadb client sends one, with
        /// connection attributes and a database.
        fn hello() -> Vec<u8> {
            let attributes = [("_client_name", "libmariadb"), ("program_name", "mariadb")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let response = HandshakeResponse::new(
                Some(&[7u8; 20][..]),
                (11, 4, 2),
                Some(&b"app"[..]),
                Some(&b"crm"[..]),
                Some(AuthPlugin::MysqlNativePassword),
                RELAYED | CapabilityFlags::CLIENT_CONNECT_ATTRS,
                Some(attributes),
                16 * 1024 * 1024,
            );
            let mut out = Vec::new();
            response.serialize(&mut out);
            out
        }

        /// Everything the front reads of a parsed response.
        fn read_all(hello: &HandshakeResponse<'_>) {
            let _ = (
                String::from_utf8_lossy(hello.user()),
                hello.db_name().map(String::from_utf8_lossy),
                hello.auth_plugin(),
                hello.scramble_buf().to_vec(),
                hello.collation(),
                hello.connect_attributes(),
            );
        }

        proptest! {
            #[test]
            fn any_handshake_response_is_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                if let Ok(hello) = read_hello(&bytes) {
                    read_all(&hello);
                }
            }

            #[test]
            fn a_damaged_handshake_response_is_read_without_panic(bytes in wire::tests::damaged(hello())) {
                if let Ok(hello) = read_hello(&bytes) {
                    read_all(&hello);
                }
            }
        }

        #[test]
        fn the_captured_mariadb_clients_response_reads_back() {
            let captured =
                wire::tests::packets(include_bytes!("../../tests/corpus/mariadb.client"));
            let hello = read_hello(&captured[0].1).expect("the mariadb client's response");
            assert_eq!(hello.user(), b"app");
            assert_eq!(hello.db_name(), Some(&b"crm"[..]));
            assert!(hello.connect_attributes().is_some_and(|a| !a.is_empty()));
        }

        #[test]
        fn an_undamaged_response_reads_back() {
            let bytes = hello();
            let hello = read_hello(&bytes).expect("a response mysql_common wrote");
            assert_eq!(hello.user(), b"app");
            assert_eq!(hello.db_name(), Some(&b"crm"[..]));
            assert_eq!(
                hello.connect_attributes().map(|a| a.len()),
                Some(2),
                "both attributes"
            );
        }
    }
}
