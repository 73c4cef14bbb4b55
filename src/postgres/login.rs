//! The upstream leg: connect as the HTTP front does (`connect`), ask for
//! TLS and verify the server's name, then log in with the sealed password.
//! Whatever the server says while refusing the login stays here: its text
//! may name the user, so only its SQLSTATE goes on.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::wire::{self, ReadError};
use super::Io;
use crate::config::{Config, DataSource};
use crate::connect::{self, failure, Attempt, LoginFailure};
use crate::credentials::Credential;
use crate::errors::ErrorCode;
use crate::state::Shared;

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    pub io: Box<dyn Io>,
    pub addr: SocketAddr,
    pub egress_ip: Option<IpAddr>,
    /// The server's BackendKeyData, for forwarding cancels.
    pub key: Option<(u32, u32)>,
    /// ParameterStatus and NoticeResponse messages the server sent after
    /// authenticating, to be relayed to the client as they were.
    pub greeting: BytesMut,
}

/// Connects and logs in within the data source's `connect_timeout_ms`,
/// trying each resolved (and egress) address once.
pub async fn open(
    shared: &Shared,
    config: &Config,
    ds: &DataSource,
    credential: Option<&Credential>,
    parameters: &[(String, String)],
) -> Result<Upstream, LoginFailure> {
    connect::login(
        shared,
        config,
        ds,
        &ds.upstream,
        |tcp, attempt| async move { login(tcp, &attempt, ds, credential, parameters).await },
    )
    .await
}

/// Asks for TLS (SSLRequest) and verifies the server as `ds` says.
pub async fn secure(
    mut tcp: TcpStream,
    ds: &DataSource,
) -> Result<(Box<dyn Io>, Option<Vec<u8>>), LoginFailure> {
    let Some(tls) = &ds.db_tls else {
        return Ok((Box::new(tcp), None));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    wire::send(&mut tcp, &request)
        .await
        .map_err(|e| failure(ErrorCode::UpstreamUnreachable, "connect", e.to_string()))?;
    match tcp.read_u8().await {
        Ok(b'S') => {}
        Ok(b'N') => {
            return Err(failure(
                ErrorCode::UpstreamTls,
                "tls",
                "the server declined TLS (sslmode is verify-full)",
            ))
        }
        Ok(_) => {
            return Err(failure(
                ErrorCode::UpstreamTls,
                "protocol",
                "the server answered the TLS request with something else",
            ))
        }
        Err(e) => {
            return Err(failure(
                ErrorCode::UpstreamUnreachable,
                "connect",
                format!("the server closed the connection: {e}"),
            ))
        }
    }
    let stream = connect::tls(tls, &ds.upstream, tcp).await?;
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::server_end_point(leaf));
    Ok((Box::new(stream), end_point))
}

async fn login(
    tcp: TcpStream,
    attempt: &Attempt,
    ds: &DataSource,
    credential: Option<&Credential>,
    parameters: &[(String, String)],
) -> Result<Upstream, LoginFailure> {
    let (mut io, end_point) = secure(tcp, ds).await?;
    let tls = ds.db_tls.is_some();
    let Some((user, password)) = credential.and_then(|c| c.login()) else {
        return Err(failure(
            ErrorCode::CredentialUnavailable,
            "auth",
            format!("data source \"{}\" has no login credential", ds.name),
        ));
    };
    let database = ds.database.as_deref().unwrap_or(user);
    let mut out = BytesMut::new();
    let startup: Vec<(&str, &str)> = [("user", user), ("database", database)]
        .into_iter()
        .chain(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    frontend::startup_message(startup.iter().copied(), &mut out).map_err(protocol)?;
    write(&mut io, &mut out).await?;
    let mut scram: Option<ScramSha256> = None;
    let mut key = None;
    let mut greeting = BytesMut::new();
    loop {
        let (tag, body) = wire::read_message(&mut io, wire::MAX_LOGIN_MESSAGE_LEN)
            .await
            .map_err(|e| match e {
                ReadError::Length(_) => failure(
                    ErrorCode::UpstreamUnreachable,
                    "protocol",
                    "the server sent an oversized or malformed message during login",
                ),
                _ => failure(
                    ErrorCode::UpstreamUnreachable,
                    "connect",
                    "the server closed the connection during login",
                ),
            })?;
        match tag {
            b'R' => {
                let code = body
                    .get(..4)
                    .map_or(u32::MAX, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                let data = &body[4.min(body.len())..];
                match code {
                    0 => {}
                    3 if tls => {
                        frontend::password_message(password.expose().as_bytes(), &mut out).map_err(protocol)?;
                        write(&mut io, &mut out).await?;
                    }
                    3 => return Err(failure(ErrorCode::UpstreamAuth, "auth", "the server asked for the password in clear text over a connection without TLS; refused")),
                    5 => {
                        let salt: [u8; 4] = data.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| protocol_error("a short MD5 salt"))?;
                        let hashed = Zeroizing::new(postgres_protocol::authentication::md5_hash(user.as_bytes(), password.expose().as_bytes(), salt));
                        frontend::password_message(hashed.as_bytes(), &mut out).map_err(protocol)?;
                        write(&mut io, &mut out).await?;
                    }
                    10 => {
                        let mechanisms: Vec<&[u8]> = data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                        let plus = mechanisms.contains(&&b"SCRAM-SHA-256-PLUS"[..]);
                        let plain = mechanisms.contains(&&b"SCRAM-SHA-256"[..]);
                        let (mechanism, binding) = match (&end_point, plus, plain) {
                            (Some(hash), true, _) => ("SCRAM-SHA-256-PLUS", ChannelBinding::tls_server_end_point(hash.clone())),
                            (Some(_), false, true) => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
                            (None, _, true) => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                            _ => return Err(failure(ErrorCode::UpstreamAuth, "auth", "the server offers no SASL mechanism sealgate supports")),
                        };
                        let client = ScramSha256::new(password.expose().as_bytes(), binding);
                        frontend::sasl_initial_response(mechanism, client.message(), &mut out).map_err(protocol)?;
                        write(&mut io, &mut out).await?;
                        scram = Some(client);
                    }
                    11 => {
                        let client = scram.as_mut().ok_or_else(|| protocol_error("SASL continue without SASL"))?;
                        client.update(data).map_err(|_| failure(ErrorCode::UpstreamAuth, "auth", "the server's SCRAM challenge is invalid"))?;
                        frontend::sasl_response(client.message(), &mut out).map_err(protocol)?;
                        write(&mut io, &mut out).await?;
                    }
                    12 => {
                        let client = scram.as_mut().ok_or_else(|| protocol_error("SASL final without SASL"))?;
                        // Proves the server knows the password too.
                        client.finish(data).map_err(|_| failure(ErrorCode::UpstreamAuth, "auth", "the server's SCRAM signature does not verify"))?;
                    }
                    _ => return Err(failure(ErrorCode::UpstreamAuth, "auth", format!("the server asked for an authentication method sealgate does not support (code {code})"))),
                }
            }
            b'E' => {
                let sqlstate = wire::error_field(&body, b'C').unwrap_or("XX000");
                let code = if sqlstate.starts_with("28") {
                    ErrorCode::UpstreamAuth
                } else {
                    ErrorCode::UpstreamUnreachable
                };
                let kind = if code == ErrorCode::UpstreamAuth {
                    "auth"
                } else {
                    "refused"
                };
                return Err(failure(
                    code,
                    kind,
                    format!("the data source refused the login (SQLSTATE {sqlstate})"),
                ));
            }
            b'K' => {
                if body.len() == 8 {
                    key = Some((
                        u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    ));
                }
            }
            b'S' | b'N' => wire::message(&mut greeting, tag, |b| b.extend_from_slice(&body)),
            b'Z' => {
                return Ok(Upstream {
                    io,
                    addr: attempt.addr,
                    egress_ip: attempt.egress_ip,
                    key,
                    greeting,
                })
            }
            b'v' => {}
            _ => return Err(protocol_error("an unexpected message during login")),
        }
    }
}

fn protocol_error(what: &str) -> LoginFailure {
    failure(
        ErrorCode::UpstreamUnreachable,
        "protocol",
        format!("the server sent {what}"),
    )
}

fn protocol(e: std::io::Error) -> LoginFailure {
    failure(ErrorCode::UpstreamUnreachable, "protocol", e.to_string())
}

/// Sends what `out` holds and empties it (wiping it: it may hold a
/// password or its hash).
async fn write<W: AsyncWrite + Unpin>(io: &mut W, out: &mut BytesMut) -> Result<(), LoginFailure> {
    let sent = wire::send(io, out).await;
    zeroize::Zeroize::zeroize(&mut out[..]);
    out.clear();
    sent.map_err(|e| {
        failure(
            ErrorCode::UpstreamUnreachable,
            "connect",
            format!("the server closed the connection: {e}"),
        )
    })
}

/// Forwards a cancel to the server a session is on: from the same egress
/// address, over TLS when the data source uses it.
pub async fn cancel(ds: &DataSource, attempt: &Attempt, key: (u32, u32)) -> Result<(), String> {
    let tcp = connect::tcp(attempt, ds.connect_timeout)
        .await
        .map_err(|e| e.describe())?;
    let (mut io, _) = secure(tcp, ds).await.map_err(|f| f.refusal.message)?;
    let mut out = BytesMut::new();
    frontend::cancel_request(key.0 as i32, key.1 as i32, &mut out);
    wire::send(&mut io, &out).await.map_err(|e| e.to_string())?;
    // The server closes when done; wait briefly so the cancel is not cut.
    let mut rest = [0u8; 1];
    let _ = tokio::time::timeout(ds.connect_timeout, io.read(&mut rest)).await;
    Ok(())
}
