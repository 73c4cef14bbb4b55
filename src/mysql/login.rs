//! The upstream leg: connect as every front does (`connect`), ask for TLS
//! and verify the server's name, then log in with the sealed password by
//! whichever plugin the server asks for. A password never leaves in clear
//! text without TLS, and never by caching_sha2's RSA exchange: over
//! plaintext only its fast path (a scramble) is used. Whatever the server
//! says while refusing the login stays here: only its error number and
//! SQLSTATE go on.

use std::collections::HashMap;

use mysql_common::constants::CapabilityFlags;
use mysql_common::io::ParseBuf;
use mysql_common::packets::{
    AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse, SslRequest,
};
use mysql_common::proto::MySerialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::wire::{self, ReadError};
use super::Io;
use crate::config::{Config, DataSource};
use crate::connect::{self, failure, Attempt, LoginFailure};
use crate::credentials::Credential;
use crate::errors::ErrorCode;
use crate::state::Shared;

/// Flags whose absence on the server would change the packets the client
/// parses: a client that negotiated them with sealgate needs them upstream.
const FORMAT_FLAGS: CapabilityFlags = CapabilityFlags::CLIENT_PROTOCOL_41
    .union(CapabilityFlags::CLIENT_SESSION_TRACK)
    .union(CapabilityFlags::CLIENT_TRANSACTIONS)
    .union(CapabilityFlags::CLIENT_MULTI_RESULTS)
    .union(CapabilityFlags::CLIENT_PS_MULTI_RESULTS);

/// What the app's handshake asked for, to be asked of the server.
pub struct ClientHello {
    /// The capabilities the app and sealgate agreed on.
    pub capabilities: CapabilityFlags,
    pub max_packet_size: u32,
    pub collation: u8,
    pub attributes: Option<HashMap<String, String>>,
}

/// A logged-in upstream session, ready for commands.
pub struct Upstream {
    pub io: Box<dyn Io>,
    pub addr: std::net::SocketAddr,
    pub egress_ip: Option<std::net::IpAddr>,
    /// The server's OK packet ending authentication (its status and
    /// session state), passed on to the app.
    pub ok: Vec<u8>,
}

pub async fn open(
    shared: &Shared,
    config: &Config,
    ds: &DataSource,
    credential: Option<&Credential>,
    hello: &ClientHello,
) -> Result<Upstream, LoginFailure> {
    connect::login(
        shared,
        config,
        ds,
        &ds.upstream,
        |tcp, attempt| async move { login(tcp, &attempt, ds, credential, hello).await },
    )
    .await
}

fn protocol_error(what: &str) -> LoginFailure {
    failure(
        ErrorCode::UpstreamUnreachable,
        "protocol",
        format!("the server sent {what}"),
    )
}

fn refused(how: &str) -> LoginFailure {
    failure(ErrorCode::UpstreamAuth, "auth", how)
}

/// Reads the server's next packet, which must carry sequence id `seq`.
async fn next<S: AsyncRead + Unpin>(io: &mut S, seq: &mut u8) -> Result<Vec<u8>, LoginFailure> {
    let (got, payload) = wire::read_packet(io, wire::MAX_HANDSHAKE_PACKET)
        .await
        .map_err(|e| match e {
            ReadError::Length(_) => protocol_error("an oversized packet during login"),
            _ => failure(
                ErrorCode::UpstreamUnreachable,
                "connect",
                "the server closed the connection during login",
            ),
        })?;
    if got != *seq {
        return Err(protocol_error("a packet out of sequence during login"));
    }
    *seq = seq.wrapping_add(1);
    Ok(payload)
}

/// Sends one packet with the next sequence id, then wipes it (it may hold
/// a password or its scramble).
async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    seq: &mut u8,
    payload: &[u8],
) -> Result<(), LoginFailure> {
    let mut out = Zeroizing::new(Vec::with_capacity(payload.len() + 4));
    wire::packet(&mut out, *seq, payload);
    *seq = seq.wrapping_add(1);
    wire::send(io, &out).await.map_err(|e| {
        failure(
            ErrorCode::UpstreamUnreachable,
            "connect",
            format!("the server closed the connection: {e}"),
        )
    })
}

/// An ERR packet ending the login: the server's words stay here.
fn login_error(payload: &[u8]) -> LoginFailure {
    let (number, sqlstate) = wire::err_fields(payload).unwrap_or((0, "HY000"));
    let (code, kind) = match number {
        // Access denied, password expired, account locked, plugin error.
        1045 | 1044 | 1251 | 1524 | 1820 | 1862 | 3118 => (ErrorCode::UpstreamAuth, "auth"),
        _ => (ErrorCode::UpstreamUnreachable, "refused"),
    };
    failure(
        code,
        kind,
        format!("the data source refused the login (error {number}, SQLSTATE {sqlstate})"),
    )
}

/// The scramble (or clear password) for `plugin`, where sealgate may send
/// it: a clear password only over TLS.
fn answer(
    plugin: &AuthPlugin<'_>,
    password: &str,
    nonce: &[u8],
    tls: bool,
) -> Result<Zeroizing<Vec<u8>>, LoginFailure> {
    match plugin {
        AuthPlugin::MysqlNativePassword | AuthPlugin::CachingSha2Password | AuthPlugin::Ed25519 => {}
        AuthPlugin::MysqlClearPassword if tls => {}
        AuthPlugin::MysqlClearPassword => {
            return Err(refused("the server asked for the password in clear text over a connection without TLS; refused"))
        }
        other => {
            return Err(refused(&format!(
                "the server asked for the auth plugin \"{}\", which sealgate does not support",
                String::from_utf8_lossy(other.as_bytes()).escape_default()
            )))
        }
    }
    let mut out = Zeroizing::new(Vec::new());
    if let Some(data) = plugin.gen_data(Some(password), nonce) {
        data.serialize(&mut out);
    }
    Ok(out)
}

async fn login(
    mut tcp: TcpStream,
    attempt: &Attempt,
    ds: &DataSource,
    credential: Option<&Credential>,
    hello: &ClientHello,
) -> Result<Upstream, LoginFailure> {
    let mut seq = 0u8;
    let greeting = next(&mut tcp, &mut seq).await?;
    if greeting.first() == Some(&wire::ERR) {
        return Err(login_error(&greeting));
    }
    let server = read_greeting(&greeting)?;
    let offered = server.capabilities();
    let required = CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH;
    let missing = (hello.capabilities & FORMAT_FLAGS | required) - offered;
    if !missing.is_empty() {
        return Err(protocol_error(&format!(
            "a greeting without capabilities sealgate relies on ({missing:?})"
        )));
    }
    let mut capabilities = (hello.capabilities & offered)
        | required
        | (offered & CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA);
    capabilities.remove(CapabilityFlags::CLIENT_SSL);
    capabilities.set(
        CapabilityFlags::CLIENT_LOCAL_FILES,
        ds.local_infile
            && hello
                .capabilities
                .contains(CapabilityFlags::CLIENT_LOCAL_FILES),
    );
    let tls = ds.db_tls.is_some();
    let mut io: Box<dyn Io> = match &ds.db_tls {
        None => Box::new(tcp),
        Some(config) => {
            if !offered.contains(CapabilityFlags::CLIENT_SSL) {
                return Err(failure(
                    ErrorCode::UpstreamTls,
                    "tls",
                    "the server declined TLS (ssl_mode is verify_identity)",
                ));
            }
            capabilities.insert(CapabilityFlags::CLIENT_SSL);
            let mut request = Vec::new();
            SslRequest::new(capabilities, hello.max_packet_size, hello.collation)
                .serialize(&mut request);
            send(&mut tcp, &mut seq, &request).await?;
            Box::new(connect::tls(config, &ds.upstream, tcp).await?)
        }
    };
    let Some((user, password)) = credential.and_then(|c| c.login()) else {
        return Err(failure(
            ErrorCode::CredentialUnavailable,
            "auth",
            format!("data source \"{}\" has no login credential", ds.name),
        ));
    };
    let password = password.expose();
    // The server's default plugin if sealgate speaks it; otherwise the
    // native scramble, and the server switches to the user's plugin.
    let mut plugin = match server.auth_plugin() {
        Some(p @ (AuthPlugin::CachingSha2Password | AuthPlugin::Ed25519)) => p.into_owned(),
        _ => AuthPlugin::MysqlNativePassword,
    };
    let mut nonce = server.nonce();
    let scramble = answer(&plugin, password, &nonce, tls)?;
    let database = ds.database.as_deref().unwrap_or(user);
    let response = HandshakeResponse::new(
        Some(scramble.as_slice()),
        server.server_version_parsed().unwrap_or((5, 7, 0)),
        Some(user.as_bytes()),
        Some(database.as_bytes()),
        Some(plugin.clone()),
        capabilities,
        hello.attributes.clone(),
        hello.max_packet_size,
    );
    let mut out = Zeroizing::new(Vec::new());
    response.serialize(&mut out);
    // The app's character set, where the server knows it: the collation
    // is the response's ninth byte (`mysql_common` picks its own).
    if let Some(collation) = out.get_mut(8) {
        *collation = hello.collation;
    }
    send(&mut io, &mut seq, &out).await?;
    let mut switched = false;
    loop {
        let payload = next(&mut io, &mut seq).await?;
        match payload.first() {
            Some(&wire::OK) => {
                return Ok(Upstream {
                    io,
                    addr: attempt.addr,
                    egress_ip: attempt.egress_ip,
                    ok: payload,
                })
            }
            Some(&wire::ERR) => return Err(login_error(&payload)),
            Some(&wire::EOF) if !switched => {
                switched = true;
                let request = read_auth_switch(&payload)?;
                plugin = request.auth_plugin().into_owned();
                nonce = switch_nonce(&request, &payload);
                let scramble = answer(&plugin, password, &nonce, tls)?;
                send(&mut io, &mut seq, &scramble).await?;
            }
            Some(&wire::AUTH_MORE_DATA) if plugin == AuthPlugin::CachingSha2Password => {
                match payload.get(1) {
                    // Fast authentication succeeded: the OK follows.
                    Some(3) => {}
                    Some(4) if tls => {
                        let mut clear = Zeroizing::new(password.as_bytes().to_vec());
                        clear.push(0);
                        send(&mut io, &mut seq, &clear).await?;
                    }
                    Some(4) => return Err(refused("the server needs caching_sha2_password's full authentication, which sealgate does only over TLS (never the RSA exchange over plaintext); log in once over TLS to fill the server's cache, or use ssl_mode = \"verify_identity\"")),
                    _ => return Err(protocol_error("unexpected caching_sha2_password data")),
                }
            }
            _ => return Err(protocol_error("an unexpected packet during login")),
        }
    }
}

/// The server's greeting (HandshakeV10): bytes from the network, before
/// the server has proved anything.
fn read_greeting(greeting: &[u8]) -> Result<HandshakePacket<'_>, LoginFailure> {
    // mysql_common computes `auth_plugin_data_len as i8 - 8`, which
    // overflows for lengths 0x80 to 0x87: a panic wherever overflow checks
    // are on. The protocol sends 0 or 21; a length past 0x7f is refused
    // before the parse. The byte follows the NUL-ended server version and
    // 20 bytes of fixed fields.
    let plugin_data_len = greeting
        .get(1..)
        .and_then(|rest| rest.iter().position(|&b| b == 0))
        .and_then(|version_len| greeting.get(1 + version_len + 21));
    if plugin_data_len.is_some_and(|&len| len > 0x7f) {
        return Err(protocol_error("a malformed greeting"));
    }
    let server: HandshakePacket<'_> = ParseBuf(greeting)
        .parse(())
        .map_err(|_| protocol_error("a malformed greeting"))?;
    if server.protocol_version() != 10 {
        return Err(protocol_error(
            "a greeting of an unsupported protocol version",
        ));
    }
    Ok(server)
}

fn read_auth_switch(payload: &[u8]) -> Result<AuthSwitchRequest<'_>, LoginFailure> {
    ParseBuf(payload)
        .parse(())
        .map_err(|_| protocol_error("a malformed auth switch request"))
}

/// The nonce of an auth switch request as the server sent it.
/// mysql_common's `plugin_data` drops a last zero byte: right for the
/// NUL-ended scramble of mysql_native_password and caching_sha2_password,
/// wrong for client_ed25519's 32 random bytes, of which one in 256 ends in
/// zero; sealgate then signed 31 bytes and MariaDB refused the login
/// (1045), now and then.
fn switch_nonce(request: &AuthSwitchRequest<'_>, payload: &[u8]) -> Vec<u8> {
    let plugin = request.auth_plugin();
    if !matches!(plugin, AuthPlugin::Ed25519) {
        return request.plugin_data().to_vec();
    }
    // 0xFE, the plugin's name and its NUL, then the data to its end.
    let data_at = 1 + plugin.as_bytes().len() + 1;
    payload.get(data_at..).unwrap_or_default().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(plugin: &str, data: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        AuthSwitchRequest::new(plugin.as_bytes(), data).serialize(&mut payload);
        let Ok(request) = read_auth_switch(&payload) else {
            panic!("an auth switch request sealgate cannot read: {payload:?}");
        };
        switch_nonce(&request, &payload)
    }

    #[test]
    fn an_ed25519_nonce_is_taken_whole_even_when_it_ends_in_zero() {
        let mut nonce: Vec<u8> = (1..=32).collect();
        assert_eq!(switch("client_ed25519", &nonce), nonce);
        nonce[31] = 0;
        assert_eq!(switch("client_ed25519", &nonce), nonce);
        let signed = |nonce: &[u8]| {
            answer(&AuthPlugin::Ed25519, "pw", nonce, false)
                .map(|answer| answer.to_vec())
                .ok()
        };
        assert_ne!(signed(&nonce), signed(&nonce[..31]));
    }

    #[test]
    fn a_nul_ended_scramble_loses_its_terminator() {
        let scramble = b"abcdefghijklmnopqrst";
        let mut sent = scramble.to_vec();
        sent.push(0);
        for plugin in ["mysql_native_password", "caching_sha2_password"] {
            assert_eq!(switch(plugin, &sent), scramble);
        }
    }

    mod properties {
        use super::super::*;
        use mysql_common::constants::StatusFlags;
        use proptest::prelude::*;

        /// A greeting as MariaDB sends one.
        fn greeting() -> Vec<u8> {
            let packet = HandshakePacket::new(
                10,
                &b"5.5.5-11.4.2-MariaDB"[..],
                7,
                *b"abcdefgh",
                Some(&b"ijklmnopqrst\0"[..]),
                CapabilityFlags::CLIENT_PROTOCOL_41
                    | CapabilityFlags::CLIENT_SECURE_CONNECTION
                    | CapabilityFlags::CLIENT_PLUGIN_AUTH
                    | CapabilityFlags::CLIENT_SSL,
                45,
                StatusFlags::SERVER_STATUS_AUTOCOMMIT,
                Some(AuthPlugin::Ed25519.as_bytes()),
            );
            let mut out = Vec::new();
            packet.serialize(&mut out);
            out
        }

        /// Everything the login reads of a greeting and an auth switch.
        fn read_all(bytes: &[u8]) {
            if let Ok(server) = read_greeting(bytes) {
                let _ = (
                    server.capabilities(),
                    server.nonce(),
                    server.auth_plugin().map(|p| p.into_owned()),
                    server.server_version_parsed(),
                );
            }
            if let Ok(request) = read_auth_switch(bytes) {
                let _ = (
                    request.auth_plugin().into_owned(),
                    request.plugin_data().to_vec(),
                );
            }
        }

        proptest! {
            #[test]
            fn any_greeting_or_auth_switch_is_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                read_all(&bytes);
            }

            #[test]
            fn a_damaged_greeting_is_read_without_panic(bytes in wire::tests::damaged(greeting())) {
                read_all(&bytes);
            }
        }

        /// Found by `./dev.sh fuzz`: mysql_common's parse of this greeting
        /// overflowed an i8 (auth_plugin_data_len 0x80) and panicked.
        #[test]
        fn a_greeting_whose_plugin_data_length_overflows_is_refused() {
            let mut greeting = [0u8; 33];
            greeting[16] = 0x80; // CLIENT_SECURE_CONNECTION
            greeting[18] = 8;
            greeting[22] = 0x80; // auth_plugin_data_len
            assert!(read_greeting(&greeting).is_err());
            let mut named = greeting.to_vec();
            named.splice(1..1, b"11.4.2-MariaDB".iter().copied());
            assert!(read_greeting(&named).is_err());
        }

        #[test]
        fn the_captured_mariadb_greeting_reads_back() {
            let captured =
                wire::tests::packets(include_bytes!("../../tests/corpus/mariadb.server"));
            let Ok(server) = read_greeting(&captured[0].1) else {
                panic!("MariaDB's greeting was refused");
            };
            assert_eq!(server.nonce().len(), 20);
            assert!(server
                .capabilities()
                .contains(CapabilityFlags::CLIENT_PLUGIN_AUTH));
        }

        #[test]
        fn an_undamaged_greeting_reads_back() {
            let bytes = greeting();
            let Ok(server) = read_greeting(&bytes) else {
                panic!("a greeting mysql_common wrote was refused");
            };
            assert_eq!(server.nonce(), b"abcdefghijklmnopqrst");
            assert_eq!(server.auth_plugin(), Some(AuthPlugin::Ed25519));
        }
    }
}
