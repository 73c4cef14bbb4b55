//! Assembles a running sealgate from a validated config: checks every
//! listener can be bound, builds pingora's `ServerConf` from our TOML,
//! starts the proxy and admin services, and owns the signal handling
//! (drain on SIGTERM, fast stop on SIGINT).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::admin::AdminService;
use crate::audit::{AuditLog, Event};
use crate::config::Config;
use crate::http::limits::{HandshakeDeadline, Handshakes};
use crate::http::{tls_settings, Limits};
use crate::metrics::{CloseReason, Metrics};
use crate::mysql::MysqlFront;
use crate::postgres::PostgresFront;
use crate::state::Shared;
use crate::unix_listener::UnixListenerService;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::services::listening::Service;

/// Once the grace period is over, how long the audit writer still gets to
/// write what is queued (the records of requests cut off among it): the
/// process exits within the grace period plus pingora's one-second runtime
/// shutdown plus this, however stuck the audit output is.
const AUDIT_FLUSH_AFTER_GRACE: Duration = Duration::from_secs(1);

/// How long before the end of the grace period database sessions still
/// open are sent 57P01.
const SESSION_GOODBYE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Audit(std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("TLS listener: {0}")]
    Tls(String),
    #[error("cannot listen on {}: {source}", path.display())]
    Unix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs sealgate until it is told to stop. Returns once drained.
pub fn serve(config: Config) -> Result<(), StartError> {
    for problem in &config.egress_problems {
        tracing::warn!("requests to this data source will be refused: {problem}");
    }
    let admin_listener = bind(config.admin.listen, "admin listener")?;
    // pingora binds its listeners later, and on failure retries for 30 s and
    // then panics inside a task, leaving a process without a listener; so
    // each address is proven bindable first.
    for addr in &config.proxy.listen {
        drop(bind(*addr, "proxy listener")?);
    }
    let tls_listen = config
        .proxy
        .tls
        .as_ref()
        .map(|t| t.listen.clone())
        .unwrap_or_default();
    let unix_listener = config
        .proxy
        .listen_unix
        .as_deref()
        .map(bind_unix)
        .transpose()?;
    for addr in &tls_listen {
        drop(bind(*addr, "proxy TLS listener")?);
    }
    let (postgres_listen, postgres_unix) = db_listeners(&config.postgres, "postgres listener")?;
    let (mysql_listen, mysql_unix) = db_listeners(&config.mysql, "mysql listener")?;
    let metrics = Metrics::new()?;
    let audit = AuditLog::open(
        &config.audit.output,
        config.audit.on_full,
        metrics.audit_dropped.clone(),
        config.audit.chain.clone(),
    )
    .map_err(StartError::Audit)?;
    let proxy_listen = config.proxy.listen.clone();
    let grace_period = config.proxy.grace_period;
    let header_timeout = config.proxy.header_timeout;
    let max_connections = config.proxy.max_connections;
    let idle_timeout = config.proxy.idle_timeout;
    let server_conf = server_conf(&config);
    let shared = Shared::new(config, metrics, audit);
    shared.audit.event(
        Event::Start,
        "ok",
        "sealgate started",
        Some(&shared.config.load().key_ids),
    );
    if let Some(tls) = &shared.config.load().proxy.tls {
        shared.record_cert_expiry(tls);
    }
    shared.record_expiries(&shared.config.load());

    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let limits = Limits {
        header_timeout,
        idle_timeout,
        permits: Arc::new(tokio::sync::Semaphore::new(max_connections)),
    };
    let mut proxy = Service::new("sealgate proxy".to_string(), limits.app(&server, &shared));
    for addr in &proxy_listen {
        proxy.add_listener(listener(addr, HTTP_READ_BUFFER));
    }
    if let (Some(handles), Some(tls)) = (&shared.tls, &shared.config.load().proxy.tls) {
        let handshakes = Arc::new(Handshakes::default());
        for addr in &tls_listen {
            proxy.add_listener(
                listener(addr, BUFFERED_READ).tls(tls_settings(handles, handshakes.clone())?),
            );
        }
        proxy
            .endpoints()
            .set_pre_tls_callback(Arc::new(HandshakeDeadline::new(
                tls.handshake_timeout,
                handshakes,
                shared
                    .metrics
                    .downstream_closed(CloseReason::TlsHandshakeTimeout)
                    .clone(),
            )));
    }
    server.add_service(proxy);
    if let Some((path, listener)) = unix_listener {
        server.add_service(background_service(
            "sealgate unix listener",
            UnixListenerService::new(limits.app(&server, &shared), path, listener),
        ));
    }
    if let Some(front) = PostgresFront::new(shared.clone()).map_err(StartError::Tls)? {
        add_db_front(
            &mut server,
            "postgres",
            front,
            &postgres_listen,
            postgres_unix,
        );
    }
    if let Some(front) = MysqlFront::new(shared.clone()).map_err(StartError::Tls)? {
        add_db_front(&mut server, "mysql", front, &mysql_listen, mysql_unix);
    }
    server.add_service(background_service(
        "sealgate admin",
        AdminService::new(
            shared.clone(),
            admin_listener,
            proxy_listen
                .iter()
                .chain(&tls_listen)
                .chain(&postgres_listen)
                .chain(&mysql_listen)
                .copied()
                .collect(),
        ),
    ));
    tracing::info!(listen = ?proxy_listen, "sealgate starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            shared: shared.clone(),
            grace_period,
        }),
    });
    shared.audit.flush_blocking(AUDIT_FLUSH_AFTER_GRACE);
    tracing::info!("sealgate stopped");
    Ok(())
}

/// A database front's TCP addresses (checked free now) and its Unix
/// socket (bound now).
type DbListeners = (
    Vec<SocketAddr>,
    Option<(std::path::PathBuf, std::os::unix::net::UnixListener)>,
);

fn db_listeners(
    front: &Option<crate::config::DbFront>,
    what: &'static str,
) -> Result<DbListeners, StartError> {
    let Some(front) = front else {
        return Ok((Vec::new(), None));
    };
    for addr in &front.listen {
        drop(bind(*addr, what)?);
    }
    let unix = front.listen_unix.as_deref().map(bind_unix).transpose()?;
    Ok((front.listen.clone(), unix))
}

fn add_db_front<A>(
    server: &mut Server,
    name: &str,
    front: A,
    listen: &[SocketAddr],
    unix: Option<(std::path::PathBuf, std::os::unix::net::UnixListener)>,
) where
    A: pingora::apps::ServerApp + Clone + Send + Sync + 'static,
{
    let mut service = Service::new(format!("sealgate {name}"), front.clone());
    for addr in listen {
        service.add_listener(listener(addr, BUFFERED_READ));
    }
    server.add_service(service);
    if let Some((path, listener)) = unix {
        server.add_service(background_service(
            &format!("sealgate {name} unix listener"),
            UnixListenerService::new(front, path, listener),
        ));
    }
}

/// A TCP listener whose connections each hold a read buffer of
/// `read_buffer` bytes instead of pingora's 64 KiB, which tokio zero-fills,
/// so every open connection keeps all of it resident.
fn listener(addr: &SocketAddr, read_buffer: usize) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::default().read(read_buffer))
}

/// The plain HTTP listener reads straight from the socket: pingora reads a
/// request head into a buffer of its own and a body through 64 KiB reads,
/// so a buffer in front only adds a copy, and 16 KiB resident per open
/// connection. Peer benchmark, 50 connections of 1 KiB (docs/BENCHMARKS.md):
/// peak RSS 18.0 MiB with 64 KiB, 16.3 with 16 KiB, 15.4 unbuffered.
const HTTP_READ_BUFFER: usize = 0;

/// TLS (rustls asks for 4 KiB at a time) and the database fronts (many
/// small messages) keep one: 16 KiB, a whole TLS record, so a TLS body
/// still arrives a record per read.
const BUFFERED_READ: usize = 16 * 1024;

fn bind_unix(
    path: &std::path::Path,
) -> Result<(std::path::PathBuf, std::os::unix::net::UnixListener), StartError> {
    let listener = crate::unix_listener::bind(path).map_err(|source| StartError::Unix {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((path.to_path_buf(), listener))
}

fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, what, source })
}

fn server_conf(config: &Config) -> ServerConf {
    // pingora's defaults put the pid file and upgrade socket in /tmp under
    // fixed names shared by every pingora process on the machine.
    let runtime_dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let id = std::process::id();
    ServerConf {
        threads: config.proxy.threads,
        grace_period_seconds: Some(config.proxy.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: runtime_dir
            .join(format!("sealgate-{id}.pid"))
            .display()
            .to_string(),
        upgrade_sock: runtime_dir
            .join(format!("sealgate-{id}.sock"))
            .display()
            .to_string(),
        daemon: false,
        // Every timeout sealgate sets (seconds, and nearly always cancelled)
        // on tokio's timer wheel instead of pingora's coarse one, whose
        // entries live until their deadline and whose thread ticks every
        // 10 ms, idle or not; under load this also costs about 2,000 fewer
        // instructions per request.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        // One thread (a sidecar whose CPU quota is one core): one
        // single-threaded runtime instead of tokio's work-stealing
        // scheduler, which with one worker still served some connections
        // far later than others (64 KiB GET p99 4-6x nginx's; see
        // docs/BENCHMARKS.md). With more threads the work-stealing
        // scheduler stays: under pingora's one-runtime-per-thread, a
        // pooled upstream connection is often not reused, because its idle
        // watch runs on a random thread and releases the connection's lock
        // before its reference (`failed to acquire reusable stream`).
        work_stealing: config.proxy.threads > 1,
        ..ServerConf::default()
    }
}

/// pingora's own watcher knows SIGTERM, SIGINT and SIGQUIT only; sealgate
/// needs to mark itself draining first, and to end the drain as soon as no
/// request is left instead of sleeping out the whole grace period.
struct Signals {
    shared: Arc<Shared>,
    grace_period: Duration,
}

fn watch(kind: SignalKind) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, ?kind, "cannot watch signal");
            None
        }
    }
}

async fn next(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = watch(SignalKind::terminate());
        let mut quit = watch(SignalKind::quit());
        let mut int = watch(SignalKind::interrupt());
        let mut hup = watch(SignalKind::hangup());
        loop {
            tokio::select! {
                _ = next(&mut term) => break,
                _ = next(&mut quit) => break,
                _ = next(&mut int) => {
                    tracing::info!("SIGINT: stopping now");
                    return ShutdownSignal::FastShutdown;
                }
                _ = next(&mut hup) => {
                    crate::notify::reloading();
                    crate::reload::reload(&self.shared);
                    crate::notify::ready();
                }
            }
        }
        tracing::info!(grace_period_s = self.grace_period.as_secs(), "draining");
        self.shared.lifecycle.begin_drain();
        self.shared
            .audit
            .event(Event::Drain, "ok", "draining: no new connections", None);
        crate::notify::stopping();
        exit_when_drained(self.shared.clone(), self.grace_period);
        ShutdownSignal::GracefulTerminate
    }
}

/// pingora sleeps out the whole grace period after it stops accepting; this
/// ends the process as soon as the last request in flight has finished.
fn exit_when_drained(shared: Arc<Shared>, grace_period: Duration) {
    let spawned = std::thread::Builder::new()
        .name("sealgate-drain".into())
        .spawn(move || {
            let deadline = Instant::now() + grace_period;
            // Let pingora close its listeners, so no new request starts after
            // the count is seen at zero.
            std::thread::sleep(Duration::from_millis(100));
            let idle = || {
                shared.metrics.active_requests.get() <= 0
                    && shared.lifecycle.open_sessions.load(Ordering::SeqCst) <= 0
            };
            // pingora drops every task when the grace period ends; sessions
            // are told a little before, so 57P01 reaches their clients.
            let goodbye = deadline.checked_sub(SESSION_GOODBYE).unwrap_or(deadline);
            while Instant::now() < deadline {
                if Instant::now() >= goodbye {
                    shared.lifecycle.end_sessions();
                }
                if idle() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    shared.audit.flush_blocking(left + AUDIT_FLUSH_AFTER_GRACE);
                    tracing::info!("drained; exiting");
                    std::process::exit(0);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(
                in_flight = shared.metrics.active_requests.get(),
                sessions = shared.lifecycle.open_sessions.load(Ordering::SeqCst),
                "grace period over with requests or sessions still open; they are cut off"
            );
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch the drain; waiting out the grace period");
    }
}
