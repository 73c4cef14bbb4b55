//! Who is asking: the callers of policy files (`[callers.NAME]`), how a
//! request proves it is one of them (a client certificate's identity, a
//! bearer token, or both naming the same caller), and which data sources
//! each may use.
//!
//! Without any caller configured, only loopback peers are served, as the
//! caller `local`, and may use every data source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The caller every loopback peer is when no callers are configured.
pub const LOCAL: &str = "local";

pub struct Caller {
    pub name: String,
    /// The data sources this caller may use, each until its `not_after`
    /// (Unix seconds) if it has one.
    pub datasources: HashMap<String, Option<u64>>,
    pub tls_identity: Option<String>,
    pub unix_uid: Option<u32>,
    token_sha256: Option<[u8; 32]>,
}

impl Caller {
    pub fn new(
        name: String,
        datasources: HashMap<String, Option<u64>>,
        tls_identity: Option<String>,
        unix_uid: Option<u32>,
        token_sha256: Option<[u8; 32]>,
    ) -> Caller {
        Caller {
            name,
            datasources,
            tls_identity,
            unix_uid,
            token_sha256,
        }
    }

    /// Whether this caller may use `datasource` at `now`: a grant past its
    /// `not_after` ends by itself, without a reload.
    pub fn access(&self, datasource: &str, now: SystemTime) -> Access {
        match self.datasources.get(datasource) {
            None => Access::NotGranted,
            Some(Some(not_after)) if has_passed(*not_after, now) => Access::Expired(*not_after),
            Some(_) => Access::Granted,
        }
    }

    /// Whether this caller has a grant of `datasource` at all (expired or
    /// not).
    pub fn grants(&self, datasource: &str) -> bool {
        self.datasources.contains_key(datasource)
    }

    /// When this caller's grant of `datasource` ends, if it does.
    pub fn grant_expiry(&self, datasource: &str) -> Option<u64> {
        self.datasources.get(datasource).copied().flatten()
    }
}

/// A caller's standing with one data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Granted,
    NotGranted,
    /// Granted until this instant (Unix seconds), which has passed.
    Expired(u64),
}

impl Access {
    /// Why a caller is refused, as the response, audit record and
    /// session's end say it; `None` when granted.
    pub fn refusal(self, caller: &str, datasource: &str) -> Option<String> {
        match self {
            Access::Granted => None,
            Access::NotGranted => Some(format!(
                "caller \"{caller}\" may not use data source \"{datasource}\""
            )),
            Access::Expired(at) => {
                // Whole seconds, as `not_after` is written.
                let stamp = crate::audit::rfc3339(UNIX_EPOCH + Duration::from_secs(at));
                let stamp = stamp
                    .split_once('.')
                    .map_or(stamp.clone(), |(s, _)| s.to_owned() + "Z");
                Some(format!(
                    "caller \"{caller}\"'s grant of data source \"{datasource}\" expired at {stamp}"
                ))
            }
        }
    }
}

/// Whether `now` is after the instant `not_after` (Unix seconds).
pub fn has_passed(not_after: u64, now: SystemTime) -> bool {
    now > UNIX_EPOCH + Duration::from_secs(not_after)
}

/// Parses `token_sha256`: the SHA-256 of a caller token, 64 hex digits.
pub fn parse_token_sha256(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "must be the SHA-256 of the token: 64 hex digits (e.g. `printf %s \"$TOKEN\" | sha256sum`)".into(),
        );
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte =
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "not hex".to_string())?;
    }
    Ok(out)
}

#[derive(Default)]
pub struct Callers {
    by_name: HashMap<String, Arc<Caller>>,
    by_tls_identity: HashMap<String, Arc<Caller>>,
    by_unix_uid: HashMap<u32, Arc<Caller>>,
}

/// What a request brings to prove who sent it.
#[derive(Default)]
pub struct Presented<'a> {
    /// The URI SAN of a verified client certificate.
    pub tls_identity: Option<&'a str>,
    /// The peer uid of a Unix-socket connection.
    pub unix_uid: Option<u32>,
    /// The `Proxy-Authorization` header.
    pub token: Option<&'a [u8]>,
    /// A caller token a database client sent as its password.
    pub password: Option<&'a [u8]>,
    /// A loopback or Unix-socket peer.
    pub local_peer: bool,
}

/// The outcome of identifying a request's caller.
pub enum Identified {
    Caller(Arc<Caller>),
    /// No callers are configured and the peer is local.
    Local,
    Unauthenticated(&'static str),
}

impl Callers {
    pub fn insert(&mut self, caller: Caller) {
        let caller = Arc::new(caller);
        if let Some(identity) = &caller.tls_identity {
            self.by_tls_identity
                .insert(identity.clone(), caller.clone());
        }
        if let Some(uid) = caller.unix_uid {
            self.by_unix_uid.insert(uid, caller.clone());
        }
        self.by_name.insert(caller.name.clone(), caller);
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Caller>> {
        self.by_name.values()
    }

    pub fn by_tls_identity(&self, identity: &str) -> Option<&Arc<Caller>> {
        self.by_tls_identity.get(identity)
    }

    pub fn by_unix_uid(&self, uid: u32) -> Option<&Arc<Caller>> {
        self.by_unix_uid.get(&uid)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Caller>> {
        self.by_name.get(name)
    }

    /// Identifies a request by its connection (client certificate or peer
    /// uid) and its `Proxy-Authorization: Bearer` token; when both name a
    /// caller they must name the same one.
    pub fn identify(&self, presented: &Presented<'_>) -> Identified {
        if self.by_name.is_empty() {
            return if presented.local_peer {
                Identified::Local
            } else {
                Identified::Unauthenticated(
                    "without configured callers only local clients are served",
                )
            };
        }
        let by_connection = match (presented.tls_identity, presented.unix_uid) {
            (Some(id), _) => match self.by_tls_identity.get(id) {
                Some(caller) => Some(caller.clone()),
                None => {
                    return Identified::Unauthenticated(
                        "the client certificate's identity is no caller",
                    )
                }
            },
            // A uid that is no caller may still present a token.
            (None, Some(uid)) => self.by_unix_uid.get(&uid).cloned(),
            (None, None) => None,
        };
        let by_token = match (presented.token, presented.password) {
            (None, None) => None,
            (Some(value), _) => match bearer_token(value) {
                Some(token) => match self.by_token(token) {
                    Identified::Caller(caller) => Some(caller),
                    other => return other,
                },
                None => {
                    return Identified::Unauthenticated(
                        "missing caller token (Proxy-Authorization: Bearer <token>)",
                    )
                }
            },
            (None, Some(token)) => match self.by_token(token) {
                Identified::Caller(caller) => Some(caller),
                other => return other,
            },
        };
        match (by_connection, by_token) {
            (Some(conn), Some(token)) if !Arc::ptr_eq(&conn, &token) => {
                Identified::Unauthenticated("the connection and the token name different callers")
            }
            (Some(caller), _) | (None, Some(caller)) => Identified::Caller(caller),
            (None, None) if presented.unix_uid.is_some() => Identified::Unauthenticated(
                "the peer uid is no caller, and no caller token was sent",
            ),
            (None, None) => Identified::Unauthenticated(
                "missing caller token (Proxy-Authorization: Bearer <token>)",
            ),
        }
    }

    /// Every caller's digest is compared, in constant time, so the time
    /// taken says nothing about which caller (if any) came close.
    fn by_token(&self, token: &[u8]) -> Identified {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for caller in self.by_name.values() {
            if let Some(expected) = &caller.token_sha256 {
                if bool::from(expected.ct_eq(&digest)) {
                    found = Some(caller.clone());
                }
            }
        }
        found.map_or(
            Identified::Unauthenticated("unknown caller token"),
            Identified::Caller,
        )
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers() -> Callers {
        let mut c = Callers::default();
        let hash = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        c.insert(Caller::new(
            "billing".into(),
            HashMap::from([("pay".to_string(), None)]),
            Some("spiffe://prod/billing".into()),
            Some(1001),
            Some(hash("tok-billing")),
        ));
        c.insert(Caller::new(
            "crm".into(),
            HashMap::from([("crm".to_string(), None)]),
            None,
            None,
            Some(hash("tok-crm")),
        ));
        c
    }

    fn name(i: Identified) -> String {
        match i {
            Identified::Caller(c) => c.name.clone(),
            Identified::Local => LOCAL.into(),
            Identified::Unauthenticated(why) => format!("401: {why}"),
        }
    }

    fn token(t: &[u8]) -> Presented<'_> {
        Presented {
            token: Some(t),
            ..Presented::default()
        }
    }

    #[test]
    fn tokens_identify_callers() {
        let c = callers();
        assert_eq!(name(c.identify(&token(b"Bearer tok-billing"))), "billing");
        assert_eq!(name(c.identify(&token(b"bearer  tok-crm "))), "crm");
        assert!(name(c.identify(&token(b"Bearer tok-other"))).starts_with("401: unknown"));
        assert!(name(c.identify(&token(b"Basic dG9rLWNybQ=="))).starts_with("401: missing"));
        let loopback = Presented {
            local_peer: true,
            ..Presented::default()
        };
        assert!(
            name(c.identify(&loopback)).starts_with("401: missing"),
            "loopback is no identity once callers exist"
        );
    }

    #[test]
    fn connections_identify_callers_and_must_agree_with_tokens() {
        let c = callers();
        let cert = |t: Option<&'static [u8]>| Presented {
            tls_identity: Some("spiffe://prod/billing"),
            token: t,
            ..Presented::default()
        };
        assert_eq!(name(c.identify(&cert(None))), "billing");
        assert_eq!(
            name(c.identify(&cert(Some(b"Bearer tok-billing")))),
            "billing"
        );
        assert!(name(c.identify(&cert(Some(b"Bearer tok-crm")))).contains("different callers"));
        let stranger = Presented {
            tls_identity: Some("spiffe://prod/other"),
            ..Presented::default()
        };
        assert!(name(c.identify(&stranger)).contains("is no caller"));
        let uid = |uid: u32, t: Option<&'static [u8]>| Presented {
            unix_uid: Some(uid),
            token: t,
            local_peer: true,
            ..Presented::default()
        };
        assert_eq!(name(c.identify(&uid(1001, None))), "billing");
        assert!(name(c.identify(&uid(1002, None))).contains("peer uid is no caller"));
        assert_eq!(name(c.identify(&uid(1002, Some(b"Bearer tok-crm")))), "crm");
        assert!(name(c.identify(&uid(1001, Some(b"Bearer tok-crm")))).contains("different callers"));
    }

    #[test]
    fn without_callers_only_local_peers_are_served() {
        let c = Callers::default();
        let local = Presented {
            local_peer: true,
            ..Presented::default()
        };
        assert_eq!(name(c.identify(&local)), LOCAL);
        assert!(name(c.identify(&token(b"Bearer x"))).starts_with("401"));
    }

    #[test]
    fn token_digests_are_64_hex_digits() {
        let d = parse_token_sha256(&"aB".repeat(32)).unwrap();
        assert_eq!(d[0], 0xab);
        assert!(parse_token_sha256("abc").is_err());
        assert!(parse_token_sha256(&"zz".repeat(32)).is_err());
    }
}
