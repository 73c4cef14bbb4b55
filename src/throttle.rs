//! Failed caller identification, throttled per peer: after
//! `MAX_FAILURES` failures from one peer within `WINDOW`, that peer is
//! answered 429 `caller_throttled` for `BLOCK`, whatever it presents.
//! Guessing tokens then costs time, and a misconfigured client shows up as
//! one clear error instead of a flood of 401s.
//!
//! A peer is its IP address (an IPv6 address by its /64, which one host
//! usually holds whole), or its uid on the Unix socket. Until a failure
//! has happened recently, checking a request costs one atomic load.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

const MAX_FAILURES: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);
pub const BLOCK: Duration = Duration::from_secs(10);
/// Peers remembered at most; past it, those whose window and block are
/// over are forgotten first, then the oldest.
const MAX_PEERS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    Ip(IpAddr),
    Uid(u32),
}

impl Peer {
    pub fn of_ip(ip: IpAddr) -> Peer {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                Peer::Ip(IpAddr::V6(net.into()))
            }
            v4 => Peer::Ip(v4),
        }
    }
}

struct Attempts {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

pub struct Throttle {
    peers: Mutex<HashMap<Peer, Attempts>>,
    epoch: Instant,
    /// When the last failure was counted, in ms since `epoch` plus one (0:
    /// never): no peer can be blocked once `WINDOW + BLOCK` has passed.
    last_failure: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            peers: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            last_failure: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// Whether `peer` is to be answered 429 now.
    pub fn is_blocked(&self, peer: Peer, now: Instant) -> bool {
        let last = self.last_failure.load(Ordering::Relaxed);
        let quiet_for = self.ms(now).saturating_sub(last);
        if last == 0 || quiet_for > (WINDOW + BLOCK).as_millis() as u64 {
            return false;
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers
            .get(&peer)
            .and_then(|a| a.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Counts one failed identification, and blocks the peer at the
    /// `MAX_FAILURES`th within a window.
    pub fn failed(&self, peer: Peer, now: Instant) {
        self.last_failure.store(self.ms(now), Ordering::Relaxed);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            forget_some(&mut peers, now);
        }
        let attempts = peers.entry(peer).or_insert(Attempts {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if now.duration_since(attempts.window_start) > WINDOW {
            attempts.window_start = now;
            attempts.failures = 0;
        }
        attempts.failures += 1;
        if attempts.failures >= MAX_FAILURES && attempts.blocked_until.is_none_or(|u| u <= now) {
            attempts.blocked_until = Some(now + BLOCK);
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
}

fn forget_some(peers: &mut HashMap<Peer, Attempts>, now: Instant) {
    peers.retain(|_, a| {
        now.duration_since(a.window_start) <= WINDOW || a.blocked_until.is_some_and(|u| now < u)
    });
    if peers.len() >= MAX_PEERS {
        if let Some(oldest) = peers
            .iter()
            .min_by_key(|(_, a)| a.window_start)
            .map(|(p, _)| *p)
        {
            peers.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_blocked_after_ten_failures_for_ten_seconds() {
        let t = Throttle::default();
        let peer = Peer::of_ip("192.0.2.7".parse().unwrap());
        let other = Peer::Uid(1000);
        let start = Instant::now();
        assert!(!t.is_blocked(peer, start));
        for i in 1..MAX_FAILURES {
            t.failed(peer, start);
            assert!(!t.is_blocked(peer, start), "failure {i}");
        }
        t.failed(peer, start);
        assert!(t.is_blocked(peer, start), "the tenth blocks");
        assert!(t.is_blocked(peer, start + Duration::from_secs(9)));
        assert!(!t.is_blocked(other, start), "only that peer");
        assert!(!t.is_blocked(peer, start + BLOCK + Duration::from_millis(1)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = Throttle::default();
        let peer = Peer::Uid(7);
        let mut at = Instant::now();
        for _ in 0..30 {
            t.failed(peer, at);
            assert!(!t.is_blocked(peer, at));
            at += WINDOW / 5 + Duration::from_millis(1);
        }
    }

    #[test]
    fn an_ipv6_peer_is_its_slash_64() {
        let a = Peer::of_ip("2001:db8:1:2::1".parse().unwrap());
        let b = Peer::of_ip("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Peer::of_ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Peer::of_ip("::ffff:10.0.0.1".parse().unwrap()),
            Peer::of_ip("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn the_peers_remembered_stay_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        for uid in 0..(MAX_PEERS as u32 + 50) {
            t.failed(Peer::Uid(uid), now);
        }
        assert!(t.peers.lock().unwrap().len() <= MAX_PEERS);
    }
}
