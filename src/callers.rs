//! Who is asking: the callers of policy files (`[callers.NAME]`), how a
//! request proves it is one of them (a client certificate's identity, a
//! bearer token, or both naming the same caller), and which data sources
//! each may use.
//!
//! Without any caller configured, only loopback peers are served, as the
//! caller `local`, and may use every data source.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The caller every loopback peer is when no callers are configured.
pub const LOCAL: &str = "local";

pub struct Caller {
    pub name: String,
    pub datasources: HashSet<String>,
    pub tls_identity: Option<String>,
    token_sha256: Option<[u8; 32]>,
}

impl Caller {
    pub fn new(
        name: String,
        datasources: HashSet<String>,
        tls_identity: Option<String>,
        token_sha256: Option<[u8; 32]>,
    ) -> Caller {
        Caller {
            name,
            datasources,
            tls_identity,
            token_sha256,
        }
    }

    pub fn may_use(&self, datasource: &str) -> bool {
        self.datasources.contains(datasource)
    }
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
}

/// The outcome of identifying a request's caller.
pub enum Identified {
    Caller(Arc<Caller>),
    /// No callers are configured and the peer is on loopback.
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

    /// Identifies a request by its client certificate's identity and its
    /// `Proxy-Authorization: Bearer` token; when both are present they must
    /// name the same caller.
    pub fn identify(
        &self,
        tls_identity: Option<&str>,
        proxy_authorization: Option<&[u8]>,
        peer_is_loopback: bool,
    ) -> Identified {
        if self.by_name.is_empty() {
            return if peer_is_loopback {
                Identified::Local
            } else {
                Identified::Unauthenticated(
                    "without configured callers only loopback clients are served",
                )
            };
        }
        let by_cert = match tls_identity {
            None => None,
            Some(id) => match self.by_tls_identity.get(id) {
                Some(caller) => Some(caller.clone()),
                None => {
                    return Identified::Unauthenticated(
                        "the client certificate's identity is no caller",
                    )
                }
            },
        };
        let by_token = match proxy_authorization {
            None => None,
            Some(value) => match self.by_token(value) {
                Identified::Caller(caller) => Some(caller),
                other => return other,
            },
        };
        match (by_cert, by_token) {
            (Some(cert), Some(token)) if !Arc::ptr_eq(&cert, &token) => {
                Identified::Unauthenticated(
                    "the client certificate and the token name different callers",
                )
            }
            (Some(caller), _) | (None, Some(caller)) => Identified::Caller(caller),
            (None, None) => Identified::Unauthenticated(
                "missing caller token (Proxy-Authorization: Bearer <token>)",
            ),
        }
    }

    /// Every caller's digest is compared, in constant time, so the time
    /// taken says nothing about which caller (if any) came close.
    fn by_token(&self, proxy_authorization: &[u8]) -> Identified {
        let Some(token) = bearer_token(proxy_authorization) else {
            return Identified::Unauthenticated(
                "missing caller token (Proxy-Authorization: Bearer <token>)",
            );
        };
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
            HashSet::from(["pay".to_string()]),
            Some("spiffe://prod/billing".into()),
            Some(hash("tok-billing")),
        ));
        c.insert(Caller::new(
            "crm".into(),
            HashSet::from(["crm".to_string()]),
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

    #[test]
    fn tokens_identify_callers() {
        let c = callers();
        assert_eq!(
            name(c.identify(None, Some(b"Bearer tok-billing"), true)),
            "billing"
        );
        assert_eq!(
            name(c.identify(None, Some(b"bearer  tok-crm "), false)),
            "crm"
        );
        assert!(name(c.identify(None, Some(b"Bearer tok-other"), true)).starts_with("401: unknown"));
        assert!(
            name(c.identify(None, Some(b"Basic dG9rLWNybQ=="), true)).starts_with("401: missing")
        );
        assert!(
            name(c.identify(None, None, true)).starts_with("401: missing"),
            "loopback is no identity once callers exist"
        );
    }

    #[test]
    fn certificates_identify_callers_and_must_agree_with_tokens() {
        let c = callers();
        let billing = Some("spiffe://prod/billing");
        assert_eq!(name(c.identify(billing, None, false)), "billing");
        assert_eq!(
            name(c.identify(billing, Some(b"Bearer tok-billing"), false)),
            "billing"
        );
        assert!(
            name(c.identify(billing, Some(b"Bearer tok-crm"), false)).contains("different callers")
        );
        assert!(name(c.identify(Some("spiffe://prod/other"), None, false)).contains("is no caller"));
    }

    #[test]
    fn without_callers_only_loopback_is_served() {
        let c = Callers::default();
        assert_eq!(name(c.identify(None, None, true)), LOCAL);
        assert!(name(c.identify(None, Some(b"Bearer x"), false)).starts_with("401"));
    }

    #[test]
    fn token_digests_are_64_hex_digits() {
        let d = parse_token_sha256(&"aB".repeat(32)).unwrap();
        assert_eq!(d[0], 0xab);
        assert!(parse_token_sha256("abc").is_err());
        assert!(parse_token_sha256(&"zz".repeat(32)).is_err());
    }
}
