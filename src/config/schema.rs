//! The external TOML schema, exactly as operators write it.
//!
//! Every value that later validation may reject is `Spanned`, so an error can
//! name the line it came from. `deny_unknown_fields` everywhere: a typo in a
//! security proxy's config must never be silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub log: RawLog,
    pub keys: Option<RawKeys>,
    pub policy: Option<RawPolicy>,
    #[serde(default)]
    pub regions: BTreeMap<Spanned<String>, RawRegion>,
    #[serde(default)]
    pub datasources: BTreeMap<Spanned<String>, RawDataSource>,
    pub postgres: Option<RawDbFront>,
    pub mysql: Option<RawDbFront>,
}

/// A database front (`[postgres]`, `[mysql]`): its own listeners, TLS negotiated
/// inside the protocol.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDbFront {
    pub listen: Option<Vec<Spanned<String>>>,
    pub listen_unix: Option<Spanned<String>>,
    pub handshake_timeout_s: Option<Spanned<u64>>,
    pub max_connections: Option<Spanned<usize>>,
    pub tls: Option<RawDbTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDbTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub dir: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    pub egress_ips: Spanned<Vec<Spanned<String>>>,
}

/// One file of the policy directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicyFile {
    pub egress: Option<RawEgress>,
    #[serde(default)]
    pub callers: BTreeMap<Spanned<String>, RawCaller>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaller {
    pub tls_identity: Option<Spanned<String>>,
    pub unix_uid: Option<Spanned<u32>>,
    pub token_sha256: Option<Spanned<String>>,
    /// Each a data source name, or `{ name = "…", not_after = "…" }`
    /// (SPEC 12); read as values so both forms keep their line.
    #[serde(default)]
    pub datasources: Vec<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_private: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    pub dir: Option<Spanned<String>>,
    pub primary: Spanned<String>,
    pub salt: Spanned<String>,
}

/// One flat table for every kind, so each field keeps its span (serde's
/// tagged enums buffer their content and lose it); which fields belong to
/// which kind is checked during validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub kind: Spanned<String>,
    pub token: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub name: Option<Spanned<String>>,
    pub value: Option<Spanned<String>>,
    /// `oauth2` (SPEC section 11).
    pub token_url: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub scopes: Option<Spanned<Vec<String>>>,
    pub params: Option<Spanned<BTreeMap<String, String>>>,
    /// `aws_sigv4`: the keys (sealed) and what they sign for.
    pub access_key_id: Option<Spanned<String>>,
    pub secret_access_key: Option<Spanned<String>>,
    pub session_token: Option<Spanned<String>>,
    pub region: Option<Spanned<String>>,
    pub service: Option<Spanned<String>>,
    /// Any kind: when the credential stops working (RFC 3339, UTC).
    pub expires_at: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<Vec<Spanned<String>>>,
    pub threads: Option<Spanned<usize>>,
    pub grace_period_s: Option<Spanned<u64>>,
    pub header_timeout_s: Option<Spanned<u64>>,
    pub listen_unix: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<usize>>,
    pub idle_timeout_s: Option<Spanned<u64>>,
    pub tls: Option<RawProxyTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyTls {
    pub listen: Vec<Spanned<String>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
    pub handshake_timeout_s: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub output: Option<Spanned<String>>,
    pub on_full: Option<Spanned<String>>,
    pub statements: Option<Spanned<String>>,
    /// Chain every line with an HMAC under a key derived from the primary
    /// master key (SPEC 12).
    pub chain: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataSource {
    pub url: Spanned<String>,
    pub region: Option<Spanned<String>>,
    pub connect_timeout_ms: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub idle_timeout_ms: Option<Spanned<u64>>,
    pub ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub pass_set_cookie: bool,
    /// Not `Spanned`: a table written with dotted keys
    /// (`credential.kind = "basic"`) has no span of its own, and a
    /// `Spanned` table refuses it; errors about the whole credential are
    /// placed at its `kind`.
    pub credential: Option<RawCredential>,
    /// Callers that log in as themselves (SPEC section 8), by caller name.
    #[serde(default)]
    pub caller_credentials: BTreeMap<Spanned<String>, RawCredential>,
    /// PostgreSQL data sources: `verify-full` (default) or `disable`.
    pub sslmode: Option<Spanned<String>>,
    /// MySQL data sources: `verify_identity` (default) or `disabled`.
    pub ssl_mode: Option<Spanned<String>>,
    /// MySQL data sources: whether `LOAD DATA LOCAL` may run; it lets the
    /// server read files from the client, so it is off unless set.
    pub local_infile: Option<Spanned<bool>>,
    /// HTTP data sources: overwrite the injected secret in response
    /// bodies; defaults to on where there is a credential.
    pub scrub_responses: Option<Spanned<bool>>,
}
