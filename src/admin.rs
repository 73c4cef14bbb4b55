//! The admin listener: health, readiness and metrics.
//!
//! It runs as a pingora background service with its own listener, not as a
//! pingora listening service: those stop accepting on SIGTERM, and the
//! admin listener must keep answering (`/readyz` 503) while sealgate drains.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::CredentialState;
use crate::state::Shared;

/// How long one admin request may take to arrive; keeps a stuck scraper
/// from holding a connection forever.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AdminService {
    shared: Arc<Shared>,
    /// Bound before pingora starts, so a busy port fails `run` at once.
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// The proxy's own listeners: readiness means they accept connections.
    proxy_listeners: Vec<SocketAddr>,
}

impl AdminService {
    pub fn new(
        shared: Arc<Shared>,
        listener: std::net::TcpListener,
        proxy_listeners: Vec<SocketAddr>,
    ) -> Self {
        AdminService {
            shared,
            listener: std::sync::Mutex::new(Some(listener)),
            proxy_listeners,
        }
    }
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let taken = self.listener.lock().ok().and_then(|mut l| l.take());
        let Some(std_listener) = taken else { return };
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin listener could not be started");
                return;
            }
        };
        tokio::spawn(mark_ready_when_listening(
            self.shared.clone(),
            self.proxy_listeners.clone(),
        ));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, &req, peer)) }
                });
                let mut builder = http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(ADMIN_HEADER_TIMEOUT);
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    }
}

/// Ready once every proxy listener is listening: that is the moment traffic
/// sent here would be served.
async fn mark_ready_when_listening(shared: Arc<Shared>, addrs: Vec<SocketAddr>) {
    for addr in addrs {
        while !listening(addr) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    shared.lifecycle.set_ready();
    crate::notify::ready();
    tracing::info!("sealgate is ready");
}

/// Whether this process holds a socket listening on `addr`, read from
/// /proc rather than by connecting: a probe that connects and hangs up
/// shows in pingora's log as a failed TLS handshake on every start.
fn listening(addr: SocketAddr) -> bool {
    let ours = own_socket_inodes();
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    // A line at a time into one buffer: the table holds every socket of the
    // host (TIME_WAIT ones too), and reading it whole cost this process
    // 2 MiB of resident memory for good.
    let Ok(file) = std::fs::File::open(table) else {
        return false;
    };
    let mut table = std::io::BufReader::new(file);
    let mut line = String::with_capacity(256);
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut table, &mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        let inode = fields.nth(5);
        const LISTEN: &str = "0A";
        if state == Some(LISTEN)
            && local.and_then(parse_proc_addr) == Some(addr)
            && inode
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|inode| ours.contains(&inode))
        {
            return true;
        }
    }
}

/// The inodes of this process's sockets (`/proc/self/fd/N -> socket:[inode]`).
fn own_socket_inodes() -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Default::default();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address as a native-endian number.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip_hex.len() / 8 {
        let value = u32::from_str_radix(ip_hex.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&value.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn handle<B>(shared: &Shared, req: &Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let path = req.uri().path();
    if path.starts_with("/v1/") && !peer.ip().to_canonical().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "/v1/ answers loopback clients only\n",
        );
    }
    match path {
        "/v1/datasources" => text(StatusCode::OK, "application/json", datasources_json(shared)),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if shared.lifecycle.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
        }
        "/readyz" if shared.lifecycle.is_ready() && !shared.audit.is_writable() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the audit output is not taking writes\n",
        ),
        "/readyz" if shared.lifecycle.is_ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n"),
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.encode(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// A credential as admin output shows it: kind, public parts, state, and
/// the secret field as the placeholder.
fn credential_json(state: &CredentialState) -> serde_json::Value {
    let mut fields = serde_json::Map::new();
    fields.insert("kind".into(), state.kind().as_str().into());
    match state {
        CredentialState::Ready(c) => {
            if let Some(username) = &c.username {
                fields.insert("username".into(), username.as_str().into());
            }
            if let Some(name) = &c.name {
                fields.insert("name".into(), name.as_str().into());
            }
            fields.insert("state".into(), "ready".into());
            if let Some(client) = c.minted() {
                let (status, expiry) = client.status();
                fields.insert("token_url".into(), client.token_url.as_str().into());
                fields.insert(
                    "token".into(),
                    serde_json::json!({
                        "state": status.as_str(),
                        "expires_at": expiry.map(crate::audit::rfc3339),
                    }),
                );
            }
            if let Some(at) = c.expires_at {
                fields.insert(
                    "expires_at".into(),
                    crate::audit::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(at),
                    )
                    .into(),
                );
            }
        }
        CredentialState::Unavailable { .. } => {
            fields.insert("state".into(), "unavailable".into());
        }
    }
    fields.insert(
        state.kind().secret_field().into(),
        SECRET_PLACEHOLDER.into(),
    );
    if let CredentialState::Ready(c) = state {
        if let Some(signer) = c.signer() {
            fields.insert("access_key_id".into(), SECRET_PLACEHOLDER.into());
            if signer.has_session_token {
                fields.insert("session_token".into(), SECRET_PLACEHOLDER.into());
            }
            fields.insert("region".into(), signer.region.as_str().into());
            fields.insert("service".into(), signer.service.as_str().into());
        }
    }
    serde_json::Value::Object(fields)
}

/// What the seeds show for a secret: that it exists, never what it is.
pub const SECRET_PLACEHOLDER: &str = "Encrypted on the server side";

fn datasources_json(shared: &Shared) -> Vec<u8> {
    let config = shared.config.load();
    let mut list: Vec<_> = config.datasources.values().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let entries: Vec<serde_json::Value> = list
        .iter()
        .map(|ds| {
            let credential = ds.credential.as_ref().map(credential_json);
            let caller_credentials: serde_json::Map<String, serde_json::Value> = ds
                .caller_credentials
                .iter()
                .map(|(caller, state)| (caller.clone(), credential_json(state)))
                .collect();
            serde_json::json!({
                "name": ds.name,
                "url": ds.url,
                "region": ds.region.as_ref().map(|r| r.name.as_str()),
                "protocol": ds.protocol.as_str(),
                "credential": credential,
                "caller_credentials": caller_credentials,
            })
        })
        .collect();
    let mut body = serde_json::to_vec_pretty(&entries).unwrap_or_default();
    body.push(b'\n');
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::shared;

    fn status(shared: &Shared, path: &str, peer: &str) -> StatusCode {
        let req = Request::get(path).body(()).unwrap();
        handle(shared, &req, peer.parse().unwrap()).status()
    }

    #[test]
    fn v1_answers_loopback_peers_only() {
        let s = shared();
        assert_eq!(
            status(&s, "/v1/datasources", "127.0.0.1:5000"),
            StatusCode::OK
        );
        assert_eq!(status(&s, "/v1/datasources", "[::1]:5000"), StatusCode::OK);
        assert_eq!(
            status(&s, "/v1/datasources", "[::ffff:127.0.0.1]:5000"),
            StatusCode::OK
        );
        assert_eq!(
            status(&s, "/v1/datasources", "10.0.0.7:5000"),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&s, "/v1/datasources", "[::ffff:10.0.0.7]:5000"),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&s, "/metrics", "10.0.0.7:5000"),
            StatusCode::OK,
            "metrics may be scraped remotely"
        );
    }

    #[test]
    fn a_listener_of_this_process_is_found_without_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(listening(addr));
        let v6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(v6) = &v6 {
            assert!(listening(v6.local_addr().unwrap()));
        }
        drop(listener);
        assert!(!listening(addr));
    }

    #[test]
    fn readiness_follows_the_lifecycle() {
        let s = shared();
        assert_eq!(
            status(&s, "/readyz", "127.0.0.1:1"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.lifecycle.set_ready();
        assert_eq!(status(&s, "/readyz", "127.0.0.1:1"), StatusCode::OK);
        s.lifecycle.begin_drain();
        assert_eq!(
            status(&s, "/readyz", "127.0.0.1:1"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(&s, "/healthz", "127.0.0.1:1"), StatusCode::OK);
    }
}
