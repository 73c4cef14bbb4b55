//! What every part of a running sealgate shares: the config in force, the
//! resolver, metrics, the audit log, and the lifecycle flags that the admin
//! listener reports.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::AuditLog;
use crate::config::{Config, ProxyTls};
use crate::metrics::Metrics;
use crate::tls::{ClientVerifier, ServerCert};
use crate::upstream::Resolver;

pub struct Shared {
    /// Swapped whole on reload; a request keeps the `Arc` it started with.
    pub config: ArcSwap<Config>,
    pub resolver: Resolver,
    pub metrics: Metrics,
    pub audit: AuditLog,
    pub lifecycle: Lifecycle,
    /// Failed caller identifications by peer.
    pub throttle: crate::throttle::Throttle,
    /// The TLS listeners' certificate and client CAs, swapped on reload.
    pub tls: Option<TlsHandles>,
    /// The same for TLS inside the PostgreSQL protocol.
    pub postgres_tls: Option<TlsHandles>,
    /// And inside the MySQL protocol.
    pub mysql_tls: Option<TlsHandles>,
    /// Counts reloads; long-lived database sessions wait on it to check
    /// whether the new config still grants what they stand on.
    pub config_changes: tokio::sync::watch::Sender<u64>,
    request_ids: RequestIds,
}

pub struct TlsHandles {
    pub cert: Arc<ServerCert>,
    pub client: Option<Arc<ClientVerifier>>,
}

impl TlsHandles {
    pub fn new(
        cert: &rustls::sign::CertifiedKey,
        client_verifier: Option<&Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> TlsHandles {
        TlsHandles {
            cert: Arc::new(ServerCert::new(cert.clone())),
            client: client_verifier.map(|v| Arc::new(ClientVerifier::new(v.clone()))),
        }
    }

    /// New certificate and client CAs for connections accepted from now
    /// on; `section` names the config section in the warning.
    pub fn replace(
        &self,
        cert: &rustls::sign::CertifiedKey,
        client_verifier: Option<&Arc<dyn rustls::server::danger::ClientCertVerifier>>,
        section: &str,
    ) {
        self.cert.replace(cert.clone());
        match (&self.client, client_verifier) {
            (Some(current), Some(verifier)) => current.replace(verifier.clone()),
            (None, None) => {}
            _ => tracing::warn!(
                "{section}.client_ca was added or removed; that takes effect at the next restart"
            ),
        }
    }
}

impl Shared {
    pub fn new(config: Config, metrics: Metrics, audit: AuditLog) -> Arc<Shared> {
        let tls = config
            .proxy
            .tls
            .as_ref()
            .map(|t| TlsHandles::new(&t.cert, t.client_verifier.as_ref()));
        let db_tls = |front: &Option<crate::config::DbFront>| {
            front
                .as_ref()
                .and_then(|p| p.tls.as_ref())
                .map(|t| TlsHandles::new(&t.cert, t.client_verifier.as_ref()))
        };
        Arc::new(Shared {
            tls,
            postgres_tls: db_tls(&config.postgres),
            mysql_tls: db_tls(&config.mysql),
            config_changes: tokio::sync::watch::Sender::new(0),
            config: ArcSwap::from_pointee(config),
            resolver: Resolver::default(),
            metrics,
            audit,
            lifecycle: Lifecycle::default(),
            throttle: Default::default(),
            request_ids: RequestIds::new(),
        })
    }

    /// Publishes when each TLS listener's certificate expires.
    pub fn record_cert_expiry(&self, tls: &ProxyTls) {
        if let Some(expiry) = crate::tls::expiry_unix(&tls.cert) {
            for addr in &tls.listen {
                self.metrics
                    .tls_cert_expiry
                    .with_label_values(&[addr.to_string().as_str()])
                    .set(expiry as f64);
            }
        }
    }

    /// Publishes each data source credential's `expires_at` (a minted
    /// token's expiry is published when it is fetched) and each grant's
    /// `not_after`, as the config in force has them.
    pub fn record_expiries(&self, config: &crate::config::Config) {
        let grants = &self.metrics.caller_grant_expiry;
        grants.reset();
        for caller in config.callers.iter() {
            for (datasource, not_after) in &caller.datasources {
                if let Some(at) = not_after {
                    grants
                        .with_label_values(&[caller.name.as_str(), datasource.as_str()])
                        .set(*at as f64);
                }
            }
        }
        for problem in &config.expired_grants {
            tracing::warn!("{problem}");
        }
        for ds in config.datasources.values() {
            let expiry = ds
                .credential
                .as_ref()
                .and_then(|c| c.ready())
                .and_then(|c| c.expires_at);
            if let Some(at) = expiry {
                self.metrics
                    .credential_expiry
                    .with_label_values(&[ds.name.as_str()])
                    .set(at as f64);
            }
        }
    }

    pub fn next_request_id(&self) -> RequestId {
        RequestId::new(self.request_ids.next())
    }
}

pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
    /// Database sessions open; the drain waits for them as for requests.
    pub open_sessions: AtomicI64,
    /// Set when the drain's grace period is over: sessions still open get
    /// 57P01 and close.
    sessions_end: tokio::sync::watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            open_sessions: AtomicI64::new(0),
            sessions_end: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Lifecycle {
    pub fn end_sessions(&self) {
        self.sessions_end.send_replace(true);
    }

    pub fn sessions_end(&self) -> tokio::sync::watch::Receiver<bool> {
        self.sessions_end.subscribe()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
    }
}

/// Request ids unique across restarts: a random per-process start plus a
/// counter, so two sealgate processes (or one restarted) never reuse an id
/// in the same audit trail.
struct RequestIds {
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        if getrandom::getrandom(&mut seed).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = (nanos ^ u64::from(std::process::id())).to_le_bytes();
        }
        RequestIds {
            next: AtomicU64::new(u64::from_le_bytes(seed)),
        }
    }

    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// A request id as the 16 lowercase hex digits that go into the response
/// header, the audit record and logs; formatted once, without `fmt` or an
/// allocation, since every request makes one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 16]);

impl RequestId {
    fn new(n: u64) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        for (i, digit) in digits.iter_mut().enumerate() {
            *digit = HEX[(n >> (60 - 4 * i) & 0xf) as usize];
        }
        RequestId(digits)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use crate::config::{self, AuditOutput, OnFull};

    /// Shared state for unit tests: one HTTP data source, the audit trail
    /// on stdout.
    pub(crate) fn shared() -> Arc<Shared> {
        let config = config::parse(
            std::path::Path::new("t.toml"),
            "[datasources.a]\nurl = \"https://example.com\"\n",
        )
        .expect("a valid config");
        let metrics = Metrics::new().expect("metrics");
        let audit = AuditLog::open(
            &AuditOutput::Stdout,
            OnFull::Block,
            metrics.audit_dropped.clone(),
            None,
        )
        .expect("an audit trail on stdout");
        Shared::new(config, metrics, audit)
    }

    #[test]
    fn request_ids_are_sixteen_hex_digits_of_the_counter() {
        for n in [0, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(RequestId::new(n).as_str(), format!("{n:016x}"));
        }
    }
}
