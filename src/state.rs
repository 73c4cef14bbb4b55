//! What every part of a running sealgate shares: the config in force, the
//! resolver, metrics, the audit log, and the lifecycle flags that the admin
//! listener reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::Resolver;

pub struct Shared {
    /// Swapped whole on reload; a request keeps the `Arc` it started with.
    pub config: ArcSwap<Config>,
    pub resolver: Resolver,
    pub metrics: Metrics,
    pub audit: AuditLog,
    pub lifecycle: Lifecycle,
    request_ids: RequestIds,
}

impl Shared {
    pub fn new(config: Config, metrics: Metrics, audit: AuditLog) -> Arc<Shared> {
        Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            resolver: Resolver::default(),
            metrics,
            audit,
            lifecycle: Lifecycle::default(),
            request_ids: RequestIds::new(),
        })
    }

    pub fn next_request_id(&self) -> u64 {
        self.request_ids.next()
    }
}

#[derive(Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Lifecycle {
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
