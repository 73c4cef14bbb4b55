//! How every front reaches a data source: the name resolved once, every
//! address judged by the egress policy, the connection made to one of
//! those very addresses from one of the region's egress addresses, and
//! each address (and egress address) tried once before giving up.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, DataSource};
use crate::errors::{ErrorCode, Refusal};
use crate::state::Shared;
use crate::upstream::{Addresses, Upstream};

/// How many resolved addresses one request or session may try.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The addresses of `target` (the data source's upstream, or a host it
/// needs, such as its token endpoint), resolved (or reused) and judged: if
/// any is blocked, none is used. Failures are counted as the data source's.
pub async fn judged_addresses(
    shared: &Shared,
    config: &Config,
    ds: &DataSource,
    target: &Upstream,
) -> Result<Addresses, Refusal> {
    let addrs = shared
        .resolver
        .resolve(&target.host, target.port, ds.connect_timeout)
        .await
        .map_err(|e| {
            shared.metrics.count_upstream_error(&ds.name, "resolve");
            Refusal::new(
                ErrorCode::UpstreamUnreachable,
                format!("resolving the upstream host: {e}"),
            )
        })?;
    config
        .egress
        .addresses(&target.host, &addrs)
        .map_err(|denial| {
            shared
                .metrics
                .egress_denied
                .with_label_values(&[ds.name.as_str(), denial.label])
                .inc();
            Refusal::new(ErrorCode::EgressDenied, denial.reason)
        })?;
    Ok(addrs)
}

/// One connection attempt: where to, from where, and how many attempts the
/// addresses and egress addresses allow in all.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub egress_ip: Option<IpAddr>,
    pub limit: usize,
}

/// The `n`th attempt (from 0). Attempts rotate through the addresses and,
/// separately, through the region's egress addresses of the same family;
/// `egress_start`, taken on the first attempt, spreads connections across
/// the region's addresses.
pub fn attempt(
    ds: &DataSource,
    addrs: &[SocketAddr],
    egress_start: &mut Option<usize>,
    n: usize,
) -> Result<Attempt, Refusal> {
    let addr = addrs[n % addrs.len()];
    let (egress_ip, egress_choices) = match &ds.region {
        None => (None, 1),
        Some(region) => {
            let same_family = |ip: &&IpAddr| ip.is_ipv4() == addr.is_ipv4();
            let choices = region.egress_ips.iter().filter(same_family).count();
            if choices == 0 {
                return Err(Refusal::new(
                    ErrorCode::UpstreamUnreachable,
                    format!(
                        "region \"{}\" has no egress address of the upstream's address family ({addr})",
                        region.name
                    ),
                ));
            }
            let start =
                *egress_start.get_or_insert_with(|| region.next.fetch_add(1, Ordering::Relaxed));
            let chosen = region
                .egress_ips
                .iter()
                .filter(same_family)
                .nth((start + n) % choices)
                .copied();
            (chosen, choices)
        }
    };
    Ok(Attempt {
        addr,
        egress_ip,
        limit: addrs.len().max(egress_choices).min(MAX_CONNECT_ATTEMPTS),
    })
}

/// Why a TCP connection attempt failed, as `upstream_errors_total{kind}`
/// names it.
#[derive(Debug)]
pub enum ConnectFailure {
    Bind(std::io::Error),
    Connect(std::io::Error),
    Timeout,
}

impl ConnectFailure {
    pub fn describe(&self) -> String {
        match self {
            ConnectFailure::Bind(e) => format!("cannot bind the egress address: {e}"),
            ConnectFailure::Connect(e) => e.to_string(),
            ConnectFailure::Timeout => "timed out".into(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ConnectFailure::Bind(_) => "bind",
            ConnectFailure::Connect(_) => "connect",
            ConnectFailure::Timeout => "timeout",
        }
    }
}

/// A TCP connection for fronts that connect themselves (pingora connects
/// for the HTTP front), bound to the attempt's egress address.
pub async fn tcp(attempt: &Attempt, timeout: Duration) -> Result<TcpStream, ConnectFailure> {
    let socket = if attempt.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnectFailure::Connect)?;
    if let Some(ip) = attempt.egress_ip {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(ConnectFailure::Bind)?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(attempt.addr))
        .await
        .map_err(|_| ConnectFailure::Timeout)?
        .map_err(ConnectFailure::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A database front's failure to reach and log in to its data source: the
/// refusal for the client, the kind `upstream_errors_total` counts it
/// under, and where it happened.
pub struct LoginFailure {
    pub refusal: Refusal,
    pub kind: &'static str,
    pub addr: Option<SocketAddr>,
    pub egress_ip: Option<IpAddr>,
}

pub fn failure(code: ErrorCode, kind: &'static str, message: impl Into<String>) -> LoginFailure {
    LoginFailure {
        refusal: Refusal::new(code, message),
        kind,
        addr: None,
        egress_ip: None,
    }
}

/// Connects as `connect` says and runs `login` on the first connection
/// made, all within the data source's `connect_timeout_ms`. A login that
/// fails is not retried elsewhere: the next server would refuse the same
/// password.
pub async fn login<T, F, Fut>(
    shared: &Shared,
    config: &Config,
    ds: &DataSource,
    target: &Upstream,
    login: F,
) -> Result<T, LoginFailure>
where
    F: FnOnce(TcpStream, Attempt) -> Fut,
    Fut: std::future::Future<Output = Result<T, LoginFailure>>,
{
    let deadline = ds.connect_timeout;
    let connected = async {
        let addrs = judged_addresses(shared, config, ds, target)
            .await
            .map_err(|refusal| LoginFailure {
                kind: if refusal.code == ErrorCode::EgressDenied {
                    "egress"
                } else {
                    "resolve"
                },
                refusal,
                addr: None,
                egress_ip: None,
            })?;
        let mut egress_start = None;
        let mut n = 0;
        loop {
            let attempt = attempt(ds, &addrs, &mut egress_start, n)
                .map_err(|refusal| failure(refusal.code, "bind", refusal.message))?;
            n += 1;
            match tcp(&attempt, deadline).await {
                Ok(tcp) => return Ok((tcp, attempt)),
                Err(e) if n < attempt.limit && !matches!(e, ConnectFailure::Timeout) => {
                    shared.metrics.count_upstream_error(&ds.name, e.kind());
                }
                Err(e) => {
                    let code = match e {
                        ConnectFailure::Timeout => ErrorCode::UpstreamTimeout,
                        _ => ErrorCode::UpstreamUnreachable,
                    };
                    let mut f = failure(
                        code,
                        e.kind(),
                        format!("connecting to {}: {}", attempt.addr, e.describe()),
                    );
                    f.addr = Some(attempt.addr);
                    f.egress_ip = attempt.egress_ip;
                    return Err(f);
                }
            }
        }
    };
    let session = async {
        let (tcp, attempt) = connected.await?;
        login(tcp, attempt).await.map_err(|mut f| {
            f.addr = Some(attempt.addr);
            f.egress_ip = attempt.egress_ip;
            f
        })
    };
    match tokio::time::timeout(deadline, session).await {
        Ok(result) => result,
        Err(_) => Err(failure(
            ErrorCode::UpstreamTimeout,
            "timeout",
            format!(
                "connect, TLS and login did not finish within {} ms",
                deadline.as_millis()
            ),
        )),
    }
}

/// TLS with a server sealgate logs in to itself (a database, a token
/// endpoint), verified as the data source says: its `ca_file` or the
/// system roots, and the server's host name, always sent as SNI.
pub async fn tls(
    tls: &Arc<rustls::ClientConfig>,
    target: &Upstream,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, LoginFailure> {
    let name = ServerName::try_from(target.sni.clone()).map_err(|_| {
        failure(
            ErrorCode::UpstreamTls,
            "tls",
            "the host is not a valid TLS server name",
        )
    })?;
    TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            failure(
                ErrorCode::UpstreamTls,
                "tls",
                format!("TLS with the server failed: {e}"),
            )
        })
}

/// A connection sealgate makes itself: TCP, or TLS over it.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to `target` for an HTTP exchange sealgate makes itself
/// (a token request, a signed body pingora cannot hold): connected as
/// `login` does, with TLS when `tls` is given, within `connect_timeout_ms`.
/// The exchange that follows has the data source's `timeout_ms`.
pub async fn open(
    shared: &Shared,
    config: &Config,
    ds: &DataSource,
    target: &Upstream,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Box<dyn Stream>, Attempt), LoginFailure> {
    login(shared, config, ds, target, |tcp, attempt| async move {
        let io: Box<dyn Stream> = match tls {
            Some(tls) => Box::new(self::tls(tls, target, tcp).await?),
            None => Box::new(tcp),
        };
        Ok((io, attempt))
    })
    .await
}
