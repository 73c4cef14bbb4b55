//! CancelRequest: each client is handed sealgate's own random
//! BackendKeyData, never the server's, so a cancel key seen on one leg is
//! worthless on the other. A cancel that arrives is looked up by its
//! process id and its secret compared in constant time; an unknown key is
//! dropped without a word, as PostgreSQL does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use subtle::ConstantTimeEq;

use crate::config::DataSource;
use crate::connect::Attempt;

/// Where a session's cancels go.
pub struct Target {
    pub datasource: Arc<DataSource>,
    pub attempt: Attempt,
    pub upstream_key: (u32, u32),
}

struct Entry {
    secret: [u8; 4],
    target: Arc<Target>,
}

#[derive(Default)]
pub struct CancelKeys {
    by_pid: Mutex<HashMap<u32, Entry>>,
}

/// A session's registration; dropping it withdraws the key.
pub struct Registered<'a> {
    keys: &'a CancelKeys,
    pub pid: u32,
    pub secret: u32,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.keys
            .by_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.pid);
    }
}

impl CancelKeys {
    /// A fresh random key for a session; `None` only if the system's
    /// random source fails.
    pub fn register(&self, target: Target) -> Option<Registered<'_>> {
        let target = Arc::new(target);
        let mut map = self.by_pid.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let mut random = [0u8; 8];
            getrandom::getrandom(&mut random).ok()?;
            let pid =
                u32::from_be_bytes([random[0], random[1], random[2], random[3]]) & 0x7fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let secret = [random[4], random[5], random[6], random[7]];
            map.insert(
                pid,
                Entry {
                    secret,
                    target: target.clone(),
                },
            );
            return Some(Registered {
                keys: self,
                pid,
                secret: u32::from_be_bytes(secret),
            });
        }
    }

    /// The session a cancel key names, if the secret matches.
    pub fn find(&self, pid: u32, secret: u32) -> Option<Arc<Target>> {
        let map = self.by_pid.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(&pid)?;
        bool::from(entry.secret.ct_eq(&secret.to_be_bytes())).then(|| entry.target.clone())
    }
}
