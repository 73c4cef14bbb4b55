//! Config: the external TOML schema (`schema`) turned into a validated
//! internal model. Nothing downstream of this module re-checks a value: if
//! `load` returns a `Config`, every address, URL, path and timeout in it is
//! usable.

mod error;
mod policy;
mod schema;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pingora::protocols::tls::CaType;
use pingora::utils::tls::WrappedX509;
use toml::Spanned;
use url::Url;

use error::ErrorSink;
pub use error::{ConfigError, ConfigErrors};
use schema::{RawConfig, RawCredential, RawDataSource, RawKeys, RawRegion};

use crate::audit_chain::ChainKey;
use crate::callers::Callers;
use crate::credentials::{Credential, CredentialKind};
use crate::egress::{Denial, EgressPolicy, Rule};
use crate::metrics::DataSourceSeries;
use crate::oauth2::{ClientAuth, OAuth2};
use crate::secrets::{Keyring, Secret, SECRET_FIELDS};
use crate::upstream::Upstream;

const DEFAULT_LISTEN: &str = "127.0.0.1:6180";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
const DEFAULT_GRACE_PERIOD_S: u64 = 10;
const DEFAULT_HEADER_TIMEOUT_S: u64 = 10;
const DEFAULT_TLS_HANDSHAKE_TIMEOUT_S: u64 = 10;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_IDLE_TIMEOUT_S: u64 = 60;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_POSTGRES_LISTEN: &str = "127.0.0.1:6432";
const DEFAULT_MYSQL_LISTEN: &str = "127.0.0.1:3307";
const DEFAULT_DB_HANDSHAKE_TIMEOUT_S: u64 = 10;
const DEFAULT_DB_MAX_CONNECTIONS: usize = 1024;
/// An hour: longer than any sane upstream timeout, short enough to catch a
/// value given in the wrong unit.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

pub struct Config {
    pub file: PathBuf,
    /// Counts reloads; part of every upstream pool key, so no pooled
    /// connection outlives the config it was opened under.
    pub generation: u64,
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub audit: AuditSettings,
    pub log: LogSettings,
    pub egress: EgressPolicy,
    pub callers: Callers,
    pub regions: HashMap<String, Arc<Region>>,
    pub datasources: HashMap<String, Arc<DataSource>>,
    /// The PostgreSQL front (`[postgres]`), when configured.
    pub postgres: Option<DbFront>,
    /// The MySQL front (`[mysql]`), when configured.
    pub mysql: Option<DbFront>,
    /// Data sources the egress policy refuses. `check` fails on them;
    /// `run` serves the rest and answers these with 403 `egress_denied`.
    pub egress_problems: Vec<ConfigError>,
    /// Grants already past their `not_after`: warnings, not errors (the
    /// grant just refuses).
    pub expired_grants: Vec<ConfigError>,
    /// The ids of the keys loaded, for the audit trail (never the keys).
    pub key_ids: Vec<String>,
}

/// A set of local source addresses that connections to a region's data
/// sources leave from.
pub struct Region {
    pub name: String,
    pub egress_ips: Vec<std::net::IpAddr>,
    /// Spreads new connections across the addresses.
    pub next: std::sync::atomic::AtomicUsize,
}

pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    pub threads: usize,
    pub grace_period: Duration,
    /// How long a caller has to send a complete request head; also how
    /// long an idle keep-alive connection is kept.
    pub header_timeout: Duration,
    /// A Unix socket whose callers are known by their peer uid.
    pub listen_unix: Option<PathBuf>,
    /// Concurrent caller connections, all listeners together.
    pub max_connections: usize,
    /// Longest wait for a caller's next bytes, or for it to take ours,
    /// once a request is under way.
    pub idle_timeout: Duration,
    pub tls: Option<ProxyTls>,
}

/// TLS termination for callers (`[proxy.tls]`).
pub struct ProxyTls {
    pub listen: Vec<SocketAddr>,
    pub cert: rustls::sign::CertifiedKey,
    /// Present with `client_ca`: the handshake then requires a client
    /// certificate signed by it.
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    /// From accept to a finished handshake; pingora has no such limit, so a
    /// client stalling mid-handshake would hold its connection forever.
    pub handshake_timeout: Duration,
}

pub struct AdminSettings {
    pub listen: SocketAddr,
}

/// A database front's listeners (`[postgres]`, `[mysql]`, SPEC sections 9
/// and 10).
pub struct DbFront {
    pub listen: Vec<SocketAddr>,
    pub listen_unix: Option<PathBuf>,
    /// Startup, TLS and caller authentication must finish within it.
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub tls: Option<DbTls>,
}

/// TLS a database client asks for inside the protocol (SSLRequest).
pub struct DbTls {
    pub cert: rustls::sign::CertifiedKey,
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// Operational logs (`[log]`): `RUST_LOG`, when set, overrides the level.
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive string, e.g. `info` or `info,sealgate=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

pub struct AuditSettings {
    pub output: AuditOutput,
    pub on_full: OnFull,
    pub statements: StatementAudit,
    /// `chain = true`: the key lines are chained under (the primary's).
    pub chain: Option<ChainKey>,
}

/// Whether database fronts record each statement (SPEC section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementAudit {
    Off,
    /// Literal-free text and its fingerprint.
    Fingerprint,
}

/// The protocol a data source speaks, from its URL's scheme; a data
/// source is served only by the front of its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Postgres,
    Mysql,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
        }
    }

    fn of_scheme(scheme: &str) -> Protocol {
        match scheme {
            "postgresql" | "postgres" => Protocol::Postgres,
            "mysql" | "mariadb" => Protocol::Mysql,
            _ => Protocol::Http,
        }
    }

    /// The credential kinds that make sense for this protocol.
    fn credential_kinds(self) -> &'static [CredentialKind] {
        match self {
            Protocol::Http => &[
                CredentialKind::Bearer,
                CredentialKind::Basic,
                CredentialKind::Header,
                CredentialKind::Query,
                CredentialKind::Oauth2,
                CredentialKind::AwsSigv4,
            ],
            Protocol::Postgres | Protocol::Mysql => &[CredentialKind::Password],
        }
    }
}

/// Which credential a request or session used, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Datasource,
    Caller,
}

impl CredentialSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialSource::Datasource => "datasource",
            CredentialSource::Caller => "caller",
        }
    }
}

/// What happens to a request's audit record when the output cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// The request waits: no record is ever lost (the default).
    Block,
    /// The record is dropped and counted: availability over completeness.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

pub struct DataSource {
    pub name: String,
    /// The URL as configured, for admin output and messages.
    pub url: String,
    pub upstream: Upstream,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// Replaces the system roots for this data source when set.
    pub ca: Option<Arc<CaType>>,
    pub pass_set_cookie: bool,
    /// Isolates this data source's pooled upstream connections: pingora's
    /// pool key ignores the per-peer CA, so without it two data sources at
    /// one address could share a connection verified against the other's CA.
    pub pool_key: u64,
    pub credential: Option<CredentialState>,
    /// Callers that log in as themselves, by caller name (SPEC section 8).
    pub caller_credentials: HashMap<String, CredentialState>,
    pub protocol: Protocol,
    /// For databases: the database opened upstream (the URL's path).
    pub database: Option<String>,
    /// For connections sealgate makes itself over TLS (databases, and
    /// SigV4 requests with bodies pingora cannot hold): the verified client
    /// configuration (the `ca_file`, else the system roots).
    pub db_tls: Option<Arc<rustls::ClientConfig>>,
    /// MySQL: `LOAD DATA LOCAL` may run (the server then reads client files).
    pub local_infile: bool,
    /// Response bodies have every form of the injected secret overwritten
    /// (SPEC 12); on by default wherever a credential is injected.
    pub scrub_responses: bool,
    pub region: Option<Arc<Region>>,
    /// The policy's verdict on this destination, judged at load.
    pub egress: Result<Arc<Rule>, Denial>,
    /// Filled by the first request that ends on this data source.
    pub series: OnceLock<DataSourceSeries>,
}

pub enum CredentialState {
    Ready(Credential),
    /// Its sealed value did not open with the keys on disk at the last
    /// reload: requests are refused (503) rather than sent without it.
    Unavailable {
        kind: CredentialKind,
        reason: String,
    },
}

impl DataSource {
    pub fn region_name(&self) -> Option<&str> {
        self.region.as_ref().map(|r| r.name.as_str())
    }

    /// The credential a caller uses here: its own when it has one (always,
    /// even if that one did not open), else the data source's.
    pub fn credential_for(
        &self,
        caller: Option<&str>,
    ) -> Option<(&CredentialState, CredentialSource)> {
        match caller.and_then(|c| self.caller_credentials.get(c)) {
            Some(own) => Some((own, CredentialSource::Caller)),
            None => self
                .credential
                .as_ref()
                .map(|c| (c, CredentialSource::Datasource)),
        }
    }

    /// Every credential of this data source, for redacting what could
    /// echo any of them.
    pub fn credentials(&self) -> impl Iterator<Item = &CredentialState> {
        self.credential
            .iter()
            .chain(self.caller_credentials.values())
    }
}

impl CredentialState {
    /// The credential, if it opened.
    pub fn ready(&self) -> Option<&Credential> {
        match self {
            CredentialState::Ready(c) => Some(c),
            CredentialState::Unavailable { .. } => None,
        }
    }
}

impl CredentialState {
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialState::Ready(c) => c.kind,
            CredentialState::Unavailable { kind, .. } => *kind,
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(path, &read(path)?)
}

/// Validates config text; `path` names it in errors and anchors relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_with(path, text, false).map(|(config, _)| config)
}

/// For SIGHUP: as `load`, except that a credential whose sealed value does
/// not open makes only its data source unavailable (returned as errors to
/// report) instead of refusing the whole config.
pub fn load_for_reload(path: &Path) -> Result<(Config, Vec<Unopened>), ConfigErrors> {
    parse_with(path, &read(path)?, true)
}

/// A data source whose credential did not open, and why.
pub type Unopened = (String, ConfigError);

fn parse_with(
    path: &Path,
    text: &str,
    reload: bool,
) -> Result<(Config, Vec<Unopened>), ConfigErrors> {
    let (raw, mut v) = start(path, text)?;
    v.reload = reload;

    let listen = match &raw.proxy.listen {
        Some(addrs) if addrs.is_empty() => {
            v.sink
                .without_line("proxy.listen", "at least one listen address is required");
            Vec::new()
        }
        Some(addrs) => addrs
            .iter()
            .filter_map(|a| v.loopback_addr(a, "proxy.listen"))
            .collect(),
        None => vec![parse_default(DEFAULT_LISTEN)],
    };
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = v.bounded(
        &raw.proxy.threads,
        "proxy.threads",
        1..=1024,
        default_threads,
    );
    let grace_s = v.bounded(
        &raw.proxy.grace_period_s,
        "proxy.grace_period_s",
        0..=3600,
        DEFAULT_GRACE_PERIOD_S,
    );
    let header_timeout = v.seconds(
        &raw.proxy.header_timeout_s,
        "proxy.header_timeout_s",
        DEFAULT_HEADER_TIMEOUT_S,
    );
    let idle_timeout = v.seconds(
        &raw.proxy.idle_timeout_s,
        "proxy.idle_timeout_s",
        DEFAULT_IDLE_TIMEOUT_S,
    );
    let max_connections = v.bounded(
        &raw.proxy.max_connections,
        "proxy.max_connections",
        1..=1_000_000,
        DEFAULT_MAX_CONNECTIONS,
    );
    let admin_listen = match &raw.admin.listen {
        Some(a) => v.socket_addr(a, "admin.listen"),
        None => Some(parse_default(DEFAULT_ADMIN_LISTEN)),
    };
    if let Some(admin) = admin_listen {
        if listen.contains(&admin) {
            v.sink.without_line(
                "admin.listen",
                format!("{admin} is also a proxy listen address"),
            );
        }
    }
    let audit_output = match &raw.audit.output {
        None => AuditOutput::Stdout,
        Some(o) if o.get_ref() == "stdout" => AuditOutput::Stdout,
        Some(o) if o.get_ref().trim().is_empty() => {
            v.sink.at(
                o.span(),
                "audit.output",
                "must be \"stdout\" or a file path",
            );
            AuditOutput::Stdout
        }
        Some(o) => AuditOutput::File(v.relative(o.get_ref())),
    };

    let keyring = raw.keys.as_ref().and_then(|k| v.keyring(k));
    let key_ids: Vec<String> = keyring
        .as_ref()
        .map(|k| k.key_ids().into_iter().map(str::to_string).collect())
        .unwrap_or_default();
    let names: std::collections::HashSet<&str> = raw
        .datasources
        .keys()
        .map(|n| n.get_ref().as_str())
        .collect();
    let mut policy_loaded = true;
    let policy::Policy {
        egress,
        callers,
        expired_grants,
    } = match &raw.policy {
        None => policy::Policy::default(),
        Some(p) => match policy::load(&v.relative(p.dir.get_ref()), &names) {
            Ok(policy) => policy,
            Err(errors) => {
                errors.into_iter().for_each(|e| v.sink.push(e));
                policy_loaded = false;
                policy::Policy::default()
            }
        },
    };
    let regions: HashMap<String, Arc<Region>> = raw
        .regions
        .iter()
        .filter_map(|(name, r)| v.region(name, r))
        .map(|r| (r.name.clone(), Arc::new(r)))
        .collect();
    let tls = raw
        .proxy
        .tls
        .as_ref()
        .and_then(|t| v.proxy_tls(t, &callers));
    let listen_unix = raw
        .proxy
        .listen_unix
        .as_ref()
        .map(|p| v.relative(p.get_ref()));
    let context = DataSourceContext {
        keys: match (&raw.keys, &keyring) {
            (None, _) => Keys::Missing,
            (Some(_), None) => Keys::Failed,
            (Some(_), Some(keyring)) => Keys::Loaded(keyring),
        },
        egress: &egress,
        policy_loaded,
        regions: &regions,
        callers: &callers,
    };
    // Every place an envelope could have been sealed for, so that one
    // copied from elsewhere in this config is named as such.
    let owned_places: Vec<(&str, String)> = raw
        .datasources
        .iter()
        .flat_map(|(name, ds)| {
            let owners = std::iter::once(None).chain(
                ds.caller_credentials
                    .keys()
                    .map(|caller| Some(caller.get_ref().as_str())),
            );
            owners.flat_map(move |caller| {
                SECRET_FIELDS.iter().map(move |f| {
                    (
                        name.get_ref().as_str(),
                        crate::secrets::field_path(caller, f),
                    )
                })
            })
        })
        .collect();
    let places: Vec<(&str, &str)> = owned_places
        .iter()
        .map(|(ds, path)| (*ds, path.as_str()))
        .collect();
    let postgres = raw
        .postgres
        .as_ref()
        .map(|front| v.db_front("postgres", front, &callers, DEFAULT_POSTGRES_LISTEN));
    let mysql = raw
        .mysql
        .as_ref()
        .map(|front| v.db_front("mysql", front, &callers, DEFAULT_MYSQL_LISTEN));
    let statements = v.one_of(
        &raw.audit.statements,
        "audit.statements",
        &[
            ("off", StatementAudit::Off),
            ("fingerprint", StatementAudit::Fingerprint),
        ],
        StatementAudit::Off,
    );
    let chain = match &raw.audit.chain {
        Some(on) if *on.get_ref() => match (&raw.keys, &keyring) {
            (Some(_), Some(keyring)) => keyring.chain_key(keyring.primary()),
            (Some(_), None) => None,
            (None, _) => {
                v.sink.at(
                    on.span(),
                    "audit.chain",
                    "needs a [keys] table: the chain key is derived from the primary master key",
                );
                None
            }
        },
        _ => None,
    };
    let on_full = v.one_of(
        &raw.audit.on_full,
        "audit.on_full",
        &[("block", OnFull::Block), ("drop", OnFull::Drop)],
        OnFull::Block,
    );
    let log = LogSettings {
        format: v.one_of(
            &raw.log.format,
            "log.format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            LogFormat::Text,
        ),
        level: match &raw.log.level {
            None => LogSettings::default().level,
            Some(l) => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(l.get_ref()) {
                    v.sink.at(
                        l.span(),
                        "log.level",
                        format!("`{}` is not a log level or filter: {e}", l.get_ref()),
                    );
                }
                l.get_ref().clone()
            }
        },
    };
    let mut datasources = HashMap::new();
    for (name, raw_ds) in &raw.datasources {
        if let Some(ds) = v.datasource(name, raw_ds, &context, &places) {
            datasources.insert(ds.name.clone(), Arc::new(ds));
        }
    }

    // `check` prints the egress problems of a config that loads; with other
    // errors they would go unseen until those are fixed.
    if v.sink.has_errors() {
        v.egress_problems.drain(..).for_each(|p| v.sink.push(p));
    }
    v.sink.finish()?;
    let config = Config {
        generation: 0,
        file: path.to_path_buf(),
        proxy: ProxySettings {
            listen,
            threads,
            grace_period: Duration::from_secs(grace_s),
            header_timeout,
            listen_unix,
            max_connections,
            idle_timeout,
            tls,
        },
        admin: AdminSettings {
            listen: admin_listen.unwrap_or_else(|| parse_default(DEFAULT_ADMIN_LISTEN)),
        },
        audit: AuditSettings {
            output: audit_output,
            on_full,
            statements,
            chain,
        },
        postgres,
        mysql,
        log,
        egress,
        callers,
        regions,
        datasources,
        egress_problems: v.egress_problems,
        expired_grants,
        key_ids,
    };
    Ok((config, v.unopened))
}

/// Just the keyring of a config file, for `seal` and `reseal`: the rest of
/// the file may still hold values that do not open (that is why they run).
pub fn load_keyring(path: &Path) -> Result<Keyring, ConfigErrors> {
    let text = read(path)?;
    let (raw, mut v) = start(path, &text)?;
    let keyring = match &raw.keys {
        Some(keys) => v.keyring(keys),
        None => {
            v.sink.without_line(
                "keys",
                "missing: sealing needs a [keys] section (dir, primary, salt)",
            );
            None
        }
    };
    v.sink.finish()?;
    keyring.ok_or_else(|| ConfigErrors(Vec::new()))
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// Parses the TOML schema and sets up validation against `text`.
fn start<'a>(path: &'a Path, text: &'a str) -> Result<(RawConfig, Validator<'a>), ConfigErrors> {
    let mut sink = ErrorSink::new(path, text);
    match toml::from_str(text) {
        Ok(raw) => Ok((
            raw,
            Validator {
                sink,
                base_dir: path.parent().unwrap_or(Path::new(".")),
                reload: false,
                unopened: Vec::new(),
                egress_problems: Vec::new(),
            },
        )),
        Err(e) => {
            sink.schema_errors::<RawConfig>(&e);
            Err(sink.into_errors())
        }
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// A data source name is one path segment of the route, so it is kept to
/// characters that need no encoding and cannot be a dot segment.
pub fn valid_datasource_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64
}

struct Validator<'a> {
    sink: ErrorSink<'a>,
    base_dir: &'a Path,
    /// Reloading: sealed values that do not open are collected in
    /// `unopened` instead of failing validation.
    reload: bool,
    unopened: Vec<Unopened>,
    egress_problems: Vec<ConfigError>,
}

/// What validating a data source needs from the rest of the config.
struct DataSourceContext<'a> {
    keys: Keys<'a>,
    egress: &'a EgressPolicy,
    /// False when a policy file had errors: what the policy would have
    /// admitted is unknown, so nothing is judged by it (its own errors are
    /// reported).
    policy_loaded: bool,
    regions: &'a HashMap<String, Arc<Region>>,
    /// A caller given its own credential must exist.
    callers: &'a Callers,
}

/// What sealed values can be opened with.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// No `[keys]` section.
    Missing,
    /// A `[keys]` section whose keys did not load; that error is reported
    /// once, not again for every sealed value.
    Failed,
    Loaded(&'a Keyring),
}

impl Validator<'_> {
    fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn socket_addr(&mut self, a: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.sink.at(
                    a.span(),
                    key,
                    format!("`{}` is not an IP:port address", a.get_ref()),
                );
                None
            }
        }
    }

    fn loopback_addr(&mut self, a: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        let addr = self.socket_addr(a, key)?;
        if !addr.ip().is_loopback() {
            self.sink.at(
                a.span(),
                key,
                format!("{addr} is not a loopback address; plain-HTTP listeners must be on loopback (remote callers come through TLS)"),
            );
            return None;
        }
        Some(addr)
    }

    /// A number that must lie in `range`; absent, `default`. Out of range is
    /// reported at its line, and validation goes on with the default.
    fn bounded<T>(
        &mut self,
        value: &Option<Spanned<T>>,
        key: &str,
        range: RangeInclusive<T>,
        default: T,
    ) -> T
    where
        T: Copy + PartialOrd + std::fmt::Display,
    {
        match value {
            Some(v) if !range.contains(v.get_ref()) => {
                self.sink.at(
                    v.span(),
                    key,
                    format!("must be between {} and {}", range.start(), range.end()),
                );
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        }
    }

    /// One of a fixed set of words; absent, `default`. Anything else is
    /// reported at its line with the words allowed.
    fn one_of<T: Copy>(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = value else {
            return default;
        };
        if let Some((_, chosen)) = choices.iter().find(|(word, _)| word == value.get_ref()) {
            return *chosen;
        }
        let words: Vec<String> = choices
            .iter()
            .map(|(word, _)| format!("\"{word}\""))
            .collect();
        self.sink.at(
            value.span(),
            key,
            format!("`{}` is not {}", value.get_ref(), words.join(" or ")),
        );
        default
    }

    /// A caller-side timeout in whole seconds, 1 s to an hour.
    fn seconds(&mut self, value: &Option<Spanned<u64>>, key: &str, default_s: u64) -> Duration {
        Duration::from_secs(self.bounded(value, key, 1..=3600, default_s))
    }

    fn timeout(&mut self, value: &Option<Spanned<u64>>, key: String, default_ms: u64) -> Duration {
        Duration::from_millis(self.bounded(value, &key, 1..=MAX_TIMEOUT_MS, default_ms))
    }

    fn keys_dir(&mut self, keys: &RawKeys) -> Option<PathBuf> {
        match &keys.dir {
            Some(dir) => Some(self.relative(dir.get_ref())),
            None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) => Some(PathBuf::from(dir)),
                None => {
                    self.sink.at(
                        keys.primary.span(),
                        "keys.dir",
                        "missing: set it, or run under systemd with LoadCredential= (which sets $CREDENTIALS_DIRECTORY)",
                    );
                    None
                }
            },
        }
    }

    fn keyring(&mut self, keys: &RawKeys) -> Option<Keyring> {
        use crate::secrets::KeyringError as E;
        let dir = self.keys_dir(keys)?;
        match Keyring::load(&dir, keys.primary.get_ref(), keys.salt.get_ref()) {
            Ok(k) => Some(k),
            Err(e) => {
                let (span, key) = match &e {
                    E::SaltEncoding | E::SaltTooShort(_) => (keys.salt.span(), "keys.salt"),
                    E::NoPrimary(..) => (keys.primary.span(), "keys.primary"),
                    _ => (
                        keys.dir.as_ref().map_or(keys.primary.span(), |d| d.span()),
                        "keys.dir",
                    ),
                };
                self.sink.at(span, key, e.to_string());
                None
            }
        }
    }

    /// The data source's credential (`caller` None) or a caller's own.
    fn credential(
        &mut self,
        ds: &str,
        caller: Option<&str>,
        c: &RawCredential,
        protocol: Protocol,
        opening: &Opening<'_>,
    ) -> Option<CredentialState> {
        let Opening {
            keys,
            places,
            client_tls,
        } = *opening;
        let key =
            |field: &str| crate::secrets::field_key(ds, &crate::secrets::field_path(caller, field));
        let kinds = protocol.credential_kinds();
        let Some(kind) = CredentialKind::parse(c.kind.get_ref()).filter(|k| kinds.contains(k))
        else {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            self.sink.at(
                c.kind.span(),
                key("kind"),
                format!(
                    "`{}` is not one of {} (the kinds of a {} data source)",
                    c.kind.get_ref(),
                    names.join(", "),
                    protocol.as_str()
                ),
            );
            return None;
        };
        let fields = [
            ("token", &c.token),
            ("username", &c.username),
            ("password", &c.password),
            ("name", &c.name),
            ("value", &c.value),
            ("token_url", &c.token_url),
            ("client_id", &c.client_id),
            ("client_secret", &c.client_secret),
            ("client_auth", &c.client_auth),
            ("access_key_id", &c.access_key_id),
            ("secret_access_key", &c.secret_access_key),
            ("session_token", &c.session_token),
            ("region", &c.region),
            ("service", &c.service),
        ];
        let (wanted, optional): (&[&str], &[&str]) = match kind {
            CredentialKind::Bearer => (&["token"], &[]),
            CredentialKind::Basic | CredentialKind::Password => (&["username", "password"], &[]),
            CredentialKind::Header | CredentialKind::Query => (&["name", "value"], &[]),
            CredentialKind::Oauth2 => (
                &["token_url", "client_id", "client_secret"],
                &["client_auth"],
            ),
            CredentialKind::AwsSigv4 => (
                &["access_key_id", "secret_access_key", "region", "service"],
                &["session_token"],
            ),
        };
        let mut complete = true;
        let oauth2_only = [
            ("scopes", c.scopes.as_ref().map(|s| s.span())),
            ("params", c.params.as_ref().map(|p| p.span())),
        ];
        for (field, span) in oauth2_only {
            if let Some(span) = span.filter(|_| kind != CredentialKind::Oauth2) {
                self.sink.at(
                    span,
                    key(field),
                    format!("does not belong to a {} credential", kind.as_str()),
                );
                complete = false;
            }
        }
        for (field, value) in fields {
            if optional.contains(&field) {
                continue;
            }
            match (wanted.contains(&field), value) {
                (false, Some(v)) => {
                    self.sink.at(
                        v.span(),
                        key(field),
                        format!("does not belong to a {} credential", kind.as_str()),
                    );
                    complete = false;
                }
                (true, None) => {
                    self.sink.at(
                        c.kind.span(),
                        key(field),
                        format!("missing: a {} credential needs it", kind.as_str()),
                    );
                    complete = false;
                }
                _ => {}
            }
        }
        let client_auth = self.one_of(
            &c.client_auth,
            &key("client_auth"),
            &[("basic", ClientAuth::Basic), ("post", ClientAuth::Post)],
            ClientAuth::Basic,
        );
        let expires_at = match &c.expires_at {
            None => None,
            Some(at) => {
                let parsed = crate::credentials::parse_utc(at.get_ref());
                if parsed.is_none() {
                    self.sink.at(
                        at.span(),
                        key("expires_at"),
                        "not a time like 2027-03-01T00:00:00Z",
                    );
                    complete = false;
                }
                parsed
            }
        };
        let secret_field = kind.secret_field();
        let sealed = fields
            .iter()
            .find(|(f, _)| *f == secret_field)
            .and_then(|(_, v)| v.as_ref())?;
        let path = crate::secrets::field_path(caller, secret_field);
        let opened = self.open(ds, &path, sealed, keys, places)?;
        if !complete {
            return None;
        }
        let secret = match opened {
            Ok(secret) => secret,
            Err(reason) => return Some(CredentialState::Unavailable { kind, reason }),
        };
        fn public(v: &Option<Spanned<String>>) -> &str {
            v.as_ref().map(|s| s.get_ref().as_str()).unwrap_or_default()
        }
        let built = match kind {
            CredentialKind::Bearer => Credential::bearer(&secret),
            CredentialKind::Basic => Credential::basic(public(&c.username), &secret),
            CredentialKind::Header => Credential::header(public(&c.name), &secret),
            CredentialKind::Query => Credential::query(public(&c.name), &secret),
            CredentialKind::Password => Credential::password(public(&c.username), secret),
            CredentialKind::AwsSigv4 => {
                for (field, value) in [("region", &c.region), ("service", &c.service)] {
                    let word = public(value);
                    let valid = !word.is_empty()
                        && word
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                    if let Some(value) = value.as_ref().filter(|_| !valid) {
                        self.sink.at(
                            value.span(),
                            key(field),
                            "lowercase letters, digits and '-', e.g. eu-west-1 or s3",
                        );
                        return None;
                    }
                }
                let mut others = Vec::new();
                for (field, value) in [
                    ("access_key_id", &c.access_key_id),
                    ("session_token", &c.session_token),
                ] {
                    let Some(sealed) = value else {
                        continue;
                    };
                    let path = crate::secrets::field_path(caller, field);
                    match self.open(ds, &path, sealed, keys, places)? {
                        Ok(opened) => others.push(opened),
                        Err(reason) => return Some(CredentialState::Unavailable { kind, reason }),
                    }
                }
                let session_token = others.get(1);
                let access_key_id = others.first()?;
                let signer = crate::sigv4::Sigv4::new(
                    access_key_id,
                    &secret,
                    session_token,
                    public(&c.region),
                    public(&c.service),
                );
                let mut secrets = vec![&secret, access_key_id];
                secrets.extend(session_token);
                Ok(Credential::sigv4(signer, &secrets))
            }
            CredentialKind::Oauth2 => {
                // Its CA settings' error is reported at `ca_file`.
                let tls = client_tls?.clone();
                let params: Vec<(String, String)> = c
                    .params
                    .as_ref()
                    .map(|p| {
                        p.get_ref()
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let scopes = c
                    .scopes
                    .as_ref()
                    .map(|s| s.get_ref().as_slice())
                    .unwrap_or_default();
                let at = c.token_url.as_ref().map_or(c.kind.span(), |u| u.span());
                match OAuth2::new(
                    public(&c.token_url),
                    public(&c.client_id),
                    &secret,
                    client_auth,
                    scopes,
                    &params,
                    Some(tls),
                ) {
                    Ok(client) => Ok(Credential::oauth2(client, &secret)),
                    Err(message) => {
                        self.sink.at(at, key("token_url"), message);
                        return None;
                    }
                }
            }
        };
        let whole = match caller {
            None => format!("datasources.{ds}.credential"),
            Some(caller) => format!(
                "datasources.{ds}.{}.{caller}",
                crate::secrets::CALLER_CREDENTIALS
            ),
        };
        built
            .map_err(|msg| self.sink.at(c.kind.span(), whole, msg))
            .ok()
            .map(|mut credential| {
                credential.expires_at = expires_at;
                CredentialState::Ready(credential)
            })
    }

    fn open(
        &mut self,
        ds: &str,
        field: &str,
        sealed: &Spanned<String>,
        keys: Keys<'_>,
        places: &[(&str, &str)],
    ) -> Option<Result<Secret, String>> {
        let key = crate::secrets::field_key(ds, field);
        if !sealed.get_ref().starts_with(crate::secrets::SEALED_PREFIX) {
            let message = crate::secrets::OpenError::Plaintext.to_string();
            self.sink.at(sealed.span(), key, message);
            return None;
        }
        let keyring = match keys {
            Keys::Loaded(keyring) => keyring,
            Keys::Failed => return None,
            Keys::Missing => {
                let message = "a sealed value needs a [keys] section to open it";
                self.sink.at(sealed.span(), key, message);
                return None;
            }
        };
        match keyring.open(ds, field, sealed.get_ref(), places) {
            Ok(secret) => Some(Ok(secret)),
            Err(e) => {
                let error = self
                    .sink
                    .error_at(sealed.span(), key, format!("sealed value {e}"));
                let reason = format!("{} {}", error.key, error.message);
                if self.reload {
                    self.unopened.push((ds.to_string(), error));
                } else {
                    self.sink.at(sealed.span(), error.key, error.message);
                }
                Some(Err(reason))
            }
        }
    }

    fn proxy_tls(&mut self, raw: &schema::RawProxyTls, callers: &Callers) -> Option<ProxyTls> {
        let mut listen = Vec::new();
        for a in &raw.listen {
            let Some(addr) = self.socket_addr(a, "proxy.tls.listen") else {
                continue;
            };
            if !addr.ip().is_loopback() && callers.is_empty() {
                self.sink.at(
                    a.span(),
                    "proxy.tls.listen",
                    format!("{addr} is not loopback, and no [callers] are configured: anyone who can reach it could use every credential"),
                );
            }
            listen.push(addr);
        }
        if listen.is_empty() {
            self.sink.without_line(
                "proxy.tls.listen",
                "at least one listen address is required",
            );
        }
        let cert = crate::tls::load_certified_key(
            &self.relative(raw.cert.get_ref()),
            &self.relative(raw.key.get_ref()),
        )
        .map_err(|message| self.sink.at(raw.cert.span(), "proxy.tls.cert", message))
        .ok();
        let client_verifier = match &raw.client_ca {
            None => None,
            Some(ca) => match crate::tls::load_client_verifier(
                &self.relative(ca.get_ref()),
                crate::tls::ClientCert::Required,
            ) {
                Ok(verifier) => Some(verifier),
                Err(message) => {
                    self.sink.at(ca.span(), "proxy.tls.client_ca", message);
                    return None;
                }
            },
        };
        let handshake_timeout = self.seconds(
            &raw.handshake_timeout_s,
            "proxy.tls.handshake_timeout_s",
            DEFAULT_TLS_HANDSHAKE_TIMEOUT_S,
        );
        Some(ProxyTls {
            listen,
            cert: cert?,
            client_verifier,
            handshake_timeout,
        })
    }

    /// The database a database URL names: its one path segment.
    fn database_name(&mut self, url: &Url, at: &Spanned<String>, key: String) -> Option<String> {
        let path = url.path().trim_start_matches('/');
        let name = percent_encoding::percent_decode_str(path).decode_utf8();
        match name {
            Ok(name) if !name.is_empty() && !name.contains('/') && !name.contains('\0') => {
                Some(name.into_owned())
            }
            _ => {
                self.sink.at(
                    at.span(),
                    key,
                    "the URL's path must name the database, e.g. postgresql://db.internal:5432/orders or mysql://db.internal:3306/crm",
                );
                None
            }
        }
    }

    /// `[postgres]`: listeners on any address, but a non-loopback one only
    /// with TLS and `[callers]` (SPEC section 9).
    fn db_front(
        &mut self,
        section: &str,
        raw: &schema::RawDbFront,
        callers: &Callers,
        default_listen: &str,
    ) -> DbFront {
        let tls = raw.tls.as_ref().and_then(|t| {
            let prefix = format!("{section}.tls");
            let cert = crate::tls::load_certified_key(
                &self.relative(t.cert.get_ref()),
                &self.relative(t.key.get_ref()),
            )
            .map_err(|message| {
                self.sink
                    .at(t.cert.span(), format!("{prefix}.cert"), message)
            })
            .ok();
            let client_verifier = match &t.client_ca {
                None => None,
                Some(ca) => {
                    match crate::tls::load_client_verifier(
                        &self.relative(ca.get_ref()),
                        crate::tls::ClientCert::Optional,
                    ) {
                        Ok(verifier) => Some(verifier),
                        Err(message) => {
                            self.sink
                                .at(ca.span(), format!("{prefix}.client_ca"), message);
                            None
                        }
                    }
                }
            };
            Some(DbTls {
                cert: cert?,
                client_verifier,
            })
        });
        let key = format!("{section}.listen");
        let listen = match &raw.listen {
            None => vec![parse_default(default_listen)],
            Some(addrs) => addrs
                .iter()
                .filter_map(|a| {
                    let addr = self.socket_addr(a, &key)?;
                    if !addr.ip().is_loopback() && (raw.tls.is_none() || callers.is_empty()) {
                        self.sink.at(
                            a.span(),
                            key.clone(),
                            format!("{addr} is not loopback: that needs [{section}.tls] and [callers], so that remote callers prove who they are over TLS"),
                        );
                    }
                    Some(addr)
                })
                .collect(),
        };
        DbFront {
            listen,
            listen_unix: raw.listen_unix.as_ref().map(|p| self.relative(p.get_ref())),
            handshake_timeout: self.seconds(
                &raw.handshake_timeout_s,
                &format!("{section}.handshake_timeout_s"),
                DEFAULT_DB_HANDSHAKE_TIMEOUT_S,
            ),
            max_connections: self.bounded(
                &raw.max_connections,
                &format!("{section}.max_connections"),
                1..=1_000_000,
                DEFAULT_DB_MAX_CONNECTIONS,
            ),
            tls,
        }
    }

    fn region(&mut self, name: &Spanned<String>, raw: &RawRegion) -> Option<Region> {
        let key = format!("regions.{}.egress_ips", name.get_ref());
        if !valid_datasource_name(name.get_ref()) {
            self.sink.at(
                name.span(),
                format!("regions.{}", name.get_ref()),
                "a region name is 1-64 letters, digits, '-' or '_'",
            );
            return None;
        }
        if raw.egress_ips.get_ref().is_empty() {
            self.sink.at(
                raw.egress_ips.span(),
                key,
                "a region needs at least one egress address",
            );
            return None;
        }
        let mut egress_ips = Vec::new();
        for ip in raw.egress_ips.get_ref() {
            match ip.get_ref().parse() {
                Ok(addr) => egress_ips.push(addr),
                Err(_) => self.sink.at(
                    ip.span(),
                    key.clone(),
                    format!("`{}` is not an IP address", ip.get_ref()),
                ),
            }
        }
        Some(Region {
            name: name.get_ref().clone(),
            egress_ips,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn datasource(
        &mut self,
        name: &Spanned<String>,
        raw: &RawDataSource,
        context: &DataSourceContext<'_>,
        places: &[(&str, &str)],
    ) -> Option<DataSource> {
        let key = |field: &str| format!("datasources.{}.{field}", name.get_ref());
        if !valid_datasource_name(name.get_ref()) {
            self.sink.at(
                name.span(),
                format!("datasources.{}", name.get_ref()),
                "a data source name is 1-64 letters, digits, '-' or '_', starting with a letter or digit",
            );
        }
        let mut protocol = Protocol::Http;
        let mut database = None;
        let upstream = match Url::parse(raw.url.get_ref()) {
            Ok(url) => match Upstream::from_url(&url) {
                Ok(u) => {
                    protocol = Protocol::of_scheme(url.scheme());
                    if protocol != Protocol::Http {
                        database = self.database_name(&url, &raw.url, key("url"));
                    }
                    Some(u)
                }
                Err(msg) => {
                    self.sink.at(raw.url.span(), key("url"), msg);
                    None
                }
            },
            Err(e) => {
                self.sink.at(
                    raw.url.span(),
                    key("url"),
                    format!("`{}` is not a valid URL: {e}", raw.url.get_ref()),
                );
                None
            }
        };
        let connect_timeout = self.timeout(
            &raw.connect_timeout_ms,
            key("connect_timeout_ms"),
            DEFAULT_CONNECT_TIMEOUT_MS,
        );
        let timeout = self.timeout(&raw.timeout_ms, key("timeout_ms"), DEFAULT_TIMEOUT_MS);
        let idle_timeout = self.timeout(
            &raw.idle_timeout_ms,
            key("idle_timeout_ms"),
            DEFAULT_IDLE_TIMEOUT_MS,
        );
        let ca = match &raw.ca_file {
            None => None,
            Some(f) => match load_ca_file(&self.relative(f.get_ref())) {
                Ok(ca) => Some(ca),
                Err(msg) => {
                    self.sink.at(f.span(), key("ca_file"), msg);
                    None
                }
            },
        };
        // Each database names its TLS setting as its own clients do.
        let (tls_key, tls_choices, mode) = match protocol {
            Protocol::Mysql => (
                "ssl_mode",
                [("verify_identity", true), ("disabled", false)],
                &raw.ssl_mode,
            ),
            _ => (
                "sslmode",
                [("verify-full", true), ("disable", false)],
                &raw.sslmode,
            ),
        };
        for (field, value, owner) in [
            ("sslmode", &raw.sslmode, "postgresql://"),
            ("ssl_mode", &raw.ssl_mode, "mysql://"),
        ] {
            if let Some(value) = value
                .as_ref()
                .filter(|_| field != tls_key || protocol == Protocol::Http)
            {
                self.sink.at(
                    value.span(),
                    key(field),
                    format!("only a {owner} data source has an {field}"),
                );
            }
        }
        let verify_tls =
            protocol == Protocol::Http || self.one_of(mode, &key(tls_key), &tls_choices, true);
        for (field, value, owner, owners) in [
            (
                "local_infile",
                &raw.local_infile,
                "a mysql://",
                Protocol::Mysql,
            ),
            (
                "scrub_responses",
                &raw.scrub_responses,
                "an http(s)://",
                Protocol::Http,
            ),
        ] {
            if let Some(value) = value.as_ref().filter(|_| protocol != owners) {
                self.sink.at(
                    value.span(),
                    key(field),
                    format!("only {owner} data source has {field}"),
                );
            }
        }
        let mut upstream = upstream;
        if let Some(u) = upstream.as_mut().filter(|_| protocol != Protocol::Http) {
            u.tls = verify_tls;
        }
        // Which credentials make sealgate connect somewhere itself: a
        // token endpoint, or (SigV4) a signed body pingora cannot hold.
        let kinds: Vec<Option<CredentialKind>> = raw
            .credential
            .iter()
            .chain(raw.caller_credentials.values())
            .map(|c| CredentialKind::parse(c.kind.get_ref()))
            .collect();
        let mints = kinds.contains(&Some(CredentialKind::Oauth2));
        let signs = kinds.contains(&Some(CredentialKind::AwsSigv4));
        if raw.ca_file.is_some() && upstream.as_ref().is_some_and(|u| !u.tls) && !mints {
            if let Some(f) = &raw.ca_file {
                self.sink.at(
                    f.span(),
                    key("ca_file"),
                    "set, but the data source does not use TLS",
                );
            }
        }
        let ca_path = raw.ca_file.as_ref().map(|f| self.relative(f.get_ref()));
        // Its own connections (a database, a token endpoint, a signed
        // body) share one verified configuration: the `ca_file`, else the
        // system roots.
        let tls_itself = upstream
            .as_ref()
            .is_some_and(|u| u.tls && (protocol != Protocol::Http || signs));
        let client_tls = if tls_itself || mints {
            crate::tls::upstream_client_config(ca_path.as_deref())
                .map_err(|message| {
                    let at = raw.ca_file.as_ref().map_or(raw.url.span(), |f| f.span());
                    self.sink.at(at, key("ca_file"), message)
                })
                .ok()
        } else {
            None
        };
        let db_tls = client_tls.clone().filter(|_| tls_itself);
        let pool_key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (
                name.get_ref(),
                raw.url.get_ref(),
                raw.ca_file.as_ref().map(|f| f.get_ref()),
            )
                .hash(&mut h);
            h.finish()
        };
        let opening = Opening {
            keys: context.keys,
            places,
            client_tls: client_tls.as_ref(),
        };
        // Every field is judged, whatever failed before it, so that one
        // run of `check` reports all there is to fix.
        let credential = raw
            .credential
            .as_ref()
            .and_then(|c| self.credential(name.get_ref(), None, c, protocol, &opening));
        let mut caller_credentials = HashMap::new();
        for (caller, c) in &raw.caller_credentials {
            let caller_key = format!(
                "datasources.{}.{}.{}",
                name.get_ref(),
                crate::secrets::CALLER_CREDENTIALS,
                caller.get_ref()
            );
            if context.policy_loaded && context.callers.get(caller.get_ref()).is_none() {
                self.sink.at(
                    caller.span(),
                    caller_key.clone(),
                    format!("no caller named \"{}\" in the policies", caller.get_ref()),
                );
            }
            let opened = self.credential(
                name.get_ref(),
                Some(caller.get_ref()),
                c,
                protocol,
                &opening,
            );
            match opened {
                Some(state) => {
                    caller_credentials.insert(caller.get_ref().clone(), state);
                }
                None => return None,
            }
        }
        let region = match &raw.region {
            None => Some(None),
            Some(r) => match context.regions.get(r.get_ref()) {
                Some(region) => Some(Some(region.clone())),
                None => {
                    self.sink.at(
                        r.span(),
                        key("region"),
                        format!("no [regions.{}] is defined", r.get_ref()),
                    );
                    None
                }
            },
        };
        let upstream = upstream?;
        if !context.policy_loaded {
            return None;
        }
        let egress = context
            .egress
            .destination(&upstream.host, upstream.port)
            .and_then(|rule| match upstream.host {
                // An IP literal can be judged by the deny list right away.
                crate::upstream::UpstreamHost::Ip(ip) => context
                    .egress
                    .addresses(
                        &upstream.host,
                        &[std::net::SocketAddr::new(ip, upstream.port)],
                    )
                    .map(|()| rule),
                crate::upstream::UpstreamHost::Name(_) => Ok(rule),
            });
        if let Err(denial) = &egress {
            let problem = self.sink.error_at(
                raw.url.span(),
                key("url"),
                format!("egress denied: {}", denial.reason),
            );
            self.egress_problems.push(problem);
        }
        let private = context
            .egress
            .private_destination(&upstream.host, upstream.port);
        if protocol != Protocol::Http && !upstream.tls && !private {
            let at = mode.as_ref().map_or(raw.url.span(), |m| m.span());
            self.sink.at(
                at,
                key(tls_key),
                format!(
                    "\"{}\" is only for a destination an allow_private entry admits",
                    tls_choices[1].0
                ),
            );
            return None;
        }
        // A token endpoint is a destination of its own: the policy must
        // allow it, and a client secret goes over https only.
        let minted = credential
            .iter()
            .chain(caller_credentials.values())
            .filter_map(|c| c.ready()?.minted());
        for client in minted {
            let target = client.target();
            let at = raw
                .credential
                .as_ref()
                .and_then(|c| c.token_url.as_ref())
                .map_or(raw.url.span(), |u| u.span());
            if let Err(denial) = context.egress.destination(&target.host, target.port) {
                let problem = self.sink.error_at(
                    at.clone(),
                    key("credential.token_url"),
                    format!("egress denied for the token endpoint: {}", denial.reason),
                );
                self.egress_problems.push(problem);
            }
            if !target.tls
                && !context
                    .egress
                    .private_destination(&target.host, target.port)
            {
                self.sink.at(
                    at,
                    key("credential.token_url"),
                    "a client secret is only sent over https://, or to a destination an allow_private entry admits",
                );
                return None;
            }
        }
        let has_credential = raw.credential.is_some() || !raw.caller_credentials.is_empty();
        if has_credential && !upstream.tls && !private {
            self.sink.at(
                raw.url.span(),
                key("url"),
                "a credential is only sent over https://, or to a destination an allow_private entry admits",
            );
            return None;
        }
        if raw.credential.is_some() && credential.is_none() {
            return None;
        }
        Some(DataSource {
            credential,
            caller_credentials,
            protocol,
            database,
            db_tls,
            local_infile: raw.local_infile.as_ref().is_some_and(|v| *v.get_ref()),
            scrub_responses: protocol == Protocol::Http
                && raw
                    .scrub_responses
                    .as_ref()
                    .map_or(has_credential, |v| *v.get_ref()),
            region: region?,
            egress,
            pool_key,
            name: name.get_ref().clone(),
            url: raw.url.get_ref().clone(),
            upstream,
            connect_timeout,
            timeout,
            idle_timeout,
            ca,
            pass_set_cookie: raw.pass_set_cookie,
            series: OnceLock::new(),
        })
    }
}

/// What opening a credential needs besides its own fields.
#[derive(Clone, Copy)]
struct Opening<'a> {
    keys: Keys<'a>,
    places: &'a [(&'a str, &'a str)],
    /// The data source's verified client configuration, which a token
    /// endpoint is verified with.
    client_tls: Option<&'a Arc<rustls::ClientConfig>>,
}

/// Loads a PEM bundle of CA certificates, refusing anything pingora would
/// panic on later (it parses certificates with `expect`).
fn load_ca_file(path: &Path) -> Result<Arc<CaType>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = item.map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
        let wrapped = WrappedX509::try_new(der.to_vec(), |raw| {
            x509_parser::parse_x509_certificate(raw).map(|(_, cert)| cert)
        })
        .map_err(|e| format!("{}: not a valid certificate: {e}", path.display()))?;
        certs.push(wrapped);
    }
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("/etc/sealgate/test.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(
            Path::new("x.toml"),
            "[datasources.a]\nurl = \"https://example.com\"\n",
        )
        .unwrap();
        assert_eq!(c.proxy.listen, vec![parse_default(DEFAULT_LISTEN)]);
        assert_eq!(c.admin.listen, parse_default(DEFAULT_ADMIN_LISTEN));
        assert_eq!(c.audit.output, AuditOutput::Stdout);
        let a = &c.datasources["a"];
        assert_eq!(a.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert!(a.ca.is_none());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = errors("[proxy]\nlisten = [\"127.0.0.1:1\"]\nlisen = 3\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("/etc/sealgate/test.toml:3: proxy.lisen: unknown field `lisen`"),
            "{e:?}"
        );
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_line() {
        let e = errors(concat!(
            "[proxy]\n",
            "listen = [\"0.0.0.0:6180\"]\n",
            "[datasources.ok]\n",
            "url = \"https://example.com\"\n",
            "[datasources.bad]\n",
            "url = \"not a url\"\n",
            "timeout_ms = 0\n",
        ));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[3].contains(":4: datasources.ok.url: egress denied"),
            "no policy allows it: {e:?}"
        );
        assert!(
            e[0].contains(":2: proxy.listen: 0.0.0.0:6180 is not a loopback address"),
            "{e:?}"
        );
        assert!(
            e[1].contains(":6: datasources.bad.url: `not a url` is not a valid URL"),
            "{e:?}"
        );
        assert!(e[2].contains(":7: datasources.bad.timeout_ms"), "{e:?}");
    }

    #[test]
    fn database_settings_are_judged_with_their_lines() {
        let e = errors(concat!(
            "[postgres]\n",
            "listen = [\"0.0.0.0:6432\"]\n",
            "[datasources.db]\n",
            "url = \"postgresql://db.example.com:5432/\"\n",
            "sslmode = \"disable\"\n",
            "credential = { kind = \"bearer\", token = \"sealed:v1:k1:x\" }\n",
            "[datasources.api]\n",
            "url = \"https://api.example.com\"\n",
            "sslmode = \"verify-full\"\n",
            "[datasources.db2]\n",
            "url = \"postgres://db2.example.com/orders\"\n",
            "sslmode = \"prefer\"\n",
        ));
        let expected = [
            ":2: postgres.listen: 0.0.0.0:6432 is not loopback: that needs [postgres.tls] and [callers]",
            ":4: datasources.db.url: the URL's path must name the database",
            ":6: datasources.db.credential.kind: `bearer` is not one of password (the kinds of a postgres data source)",
            ":9: datasources.api.sslmode: only a postgresql:// data source has an sslmode",
            ":12: datasources.db2.sslmode: `prefer` is not \"verify-full\" or \"disable\"",
        ];
        for want in expected {
            assert!(e.iter().any(|line| line.contains(want)), "{want} in {e:#?}");
        }
    }

    #[test]
    fn minted_credentials_are_judged_with_their_lines() {
        let e = errors(concat!(
            "[datasources.crm]\n",
            "url = \"https://crm.example.com\"\n",
            "credential = { kind = \"oauth2\", token_url = \"https://login.example.com/token\", client_id = \"a\", client_secret = \"sealed:v1:k1:x\", client_auth = \"jwt\" }\n",
            "[datasources.s3]\n",
            "url = \"https://s3.example.com\"\n",
            "credential = { kind = \"aws_sigv4\", access_key_id = \"sealed:v1:k1:x\", secret_access_key = \"sealed:v1:k1:y\", service = \"s3\" }\n",
            "[datasources.api]\n",
            "url = \"https://api.example.com\"\n",
            "credential = { kind = \"bearer\", token = \"sealed:v1:k1:x\", scopes = [\"a\"], expires_at = \"soon\" }\n",
        ));
        let expected = [
            ":9: datasources.api.credential.expires_at: not a time like 2027-03-01T00:00:00Z",
            ":3: datasources.crm.credential.client_auth: `jwt` is not \"basic\" or \"post\"",
            ":6: datasources.s3.credential.region: missing: a aws_sigv4 credential needs it",
            ":9: datasources.api.credential.scopes: does not belong to a bearer credential",
        ];
        for want in expected {
            assert!(e.iter().any(|line| line.contains(want)), "{want} in {e:#?}");
        }
    }

    #[test]
    fn mysql_settings_are_judged_with_their_lines() {
        let e = errors(concat!(
            "[mysql]\n",
            "listen = [\"0.0.0.0:3307\"]\n",
            "[datasources.crm]\n",
            "url = \"mysql://crm.example.com/crm\"\n",
            "ssl_mode = \"disabled\"\n",
            "sslmode = \"disable\"\n",
            "[datasources.pg]\n",
            "url = \"postgresql://db.example.com/orders\"\n",
            "ssl_mode = \"verify_identity\"\n",
            "local_infile = true\n",
            "[datasources.maria]\n",
            "url = \"mariadb://maria.example.com:3306/\"\n",
            "ssl_mode = \"required\"\n",
            "scrub_responses = false\n",
        ));
        let expected = [
            ":2: mysql.listen: 0.0.0.0:3307 is not loopback: that needs [mysql.tls] and [callers]",
            ":5: datasources.crm.ssl_mode: \"disabled\" is only for a destination an allow_private entry admits",
            ":6: datasources.crm.sslmode: only a postgresql:// data source has an sslmode",
            ":9: datasources.pg.ssl_mode: only a mysql:// data source has an ssl_mode",
            ":10: datasources.pg.local_infile: only a mysql:// data source has local_infile",
            ":12: datasources.maria.url: the URL's path must name the database",
            ":13: datasources.maria.ssl_mode: `required` is not \"verify_identity\" or \"disabled\"",
            ":14: datasources.maria.scrub_responses: only an http(s):// data source has scrub_responses",
        ];
        for want in expected {
            assert!(e.iter().any(|line| line.contains(want)), "{want} in {e:#?}");
        }
    }

    /// One run of `check` names everything wrong with a data source, not
    /// just the first field that failed.
    #[test]
    fn every_field_of_a_data_source_is_judged_whatever_failed_first() {
        let e = errors(concat!(
            "[datasources.bad]\n",
            "url = \"http://exa mple.com\"\n",
            "region = \"nowhere\"\n",
            "timeout_ms = 0\n",
            "credential = { kind = \"bearer\", token = \"plaintext\" }\n",
        ));
        for (line, key) in [
            (2, "datasources.bad.url"),
            (3, "datasources.bad.region"),
            (4, "datasources.bad.timeout_ms"),
            (5, "datasources.bad.credential.token"),
        ] {
            assert!(
                e.iter().any(|m| m.contains(&format!(":{line}: {key}:"))),
                "{key} in {e:?}"
            );
        }
    }

    /// serde stops at the first wrong type or unknown key; `check` goes on
    /// to the next.
    #[test]
    fn every_schema_error_is_reported_not_just_the_first() {
        let e = errors(concat!(
            "[proxy]\n",
            "threads = \"two\"\n",
            "bogus = 1\n",
            "[unknown_table]\n",
            "x = 1\n",
            "[datasources.a]\n",
            "url = \"https://example.com\"\n",
            "timeout_ms = \"5000\"\n",
            "[datasources.b]\n",
            "url = \"https://example.com\"\n",
            "pass_set_cookie = \"yes\"\n",
            "[datasources.c]\n",
            "url = 5\n",
        ));
        for line in [2, 3, 4, 8, 11, 13] {
            assert!(
                e.iter().any(|m| m.contains(&format!("test.toml:{line}:"))),
                "line {line} in {e:?}"
            );
        }
        assert!(
            !e.iter().any(|m| m.contains(":5:")),
            "no error follows from a blanked table: {e:?}"
        );
    }

    /// A data source the policy refuses is reported next to any other
    /// error, not only once the rest is fixed.
    #[test]
    fn egress_problems_are_reported_with_the_other_errors() {
        let e = errors(concat!(
            "[datasources.bad]\n",
            "url = \"not a url\"\n",
            "[datasources.elsewhere]\n",
            "url = \"https://example.net\"\n",
        ));
        assert!(e.iter().any(|m| m.contains("datasources.bad.url")), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.contains(":4: datasources.elsewhere.url: egress denied")),
            "{e:?}"
        );
    }

    #[test]
    fn dotted_keys_are_tables_like_any_other() {
        let e = errors(concat!(
            "[datasources.pay]\n",
            "url = \"https://example.com\"\n",
            "credential.kind = \"basic\"\n",
            "credential.username = \"svc\"\n",
            "credential.password = \"plaintext\"\n",
        ));
        assert!(
            e[0].contains(":5: datasources.pay.credential.password: holds a plaintext secret"),
            "{e:?}"
        );
    }

    /// A policy file that fails to load is reported; what it would have
    /// allowed is not guessed at, so no error follows from its absence.
    #[test]
    fn a_broken_policy_file_is_reported_without_errors_that_follow_from_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/p.toml"),
            "[egress]\nallow_private = [\"127.0.0.1/32:8080\"]\nbogus = 1\n",
        )
        .unwrap();
        let config = dir.path().join("sealgate.toml");
        let text = "[policy]\ndir = \"policies\"\n[datasources.local]\n\
                    url = \"http://127.0.0.1:8080\"\n\
                    credential = { kind = \"bearer\", token = \"plaintext\" }\n";
        let e: Vec<String> = match parse(&config, text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        };
        assert!(
            e.iter()
                .any(|m| m.contains("p.toml") && m.contains("bogus")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.contains("plaintext secret")), "{e:?}");
        assert!(
            !e.iter().any(|m| m.contains("only sent over https")),
            "{e:?}"
        );
    }

    /// Keys that fail to load are one error, not one more per sealed value.
    #[test]
    fn keys_that_fail_to_load_are_reported_once() {
        let e = errors(concat!(
            "[keys]\n",
            "dir = \"/nonexistent/keys\"\n",
            "primary = \"k1\"\n",
            "salt = \"c2VhbGdhdGUtdGVzdC1zYWx0LTEyMzQ1Njc4OTA=\"\n",
            "[datasources.a]\n",
            "url = \"https://example.com\"\n",
            "credential = { kind = \"bearer\", token = \"sealed:v1:k1:AAAA\" }\n",
            "[datasources.b]\n",
            "url = \"https://example.com\"\n",
            "credential = { kind = \"bearer\", token = \"sealed:v1:k1:AAAA\" }\n",
        ));
        assert!(e.iter().any(|m| m.contains("keys.dir")), "{e:?}");
        assert!(
            !e.iter().any(|m| m.contains("needs a [keys] section")),
            "{e:?}"
        );
    }

    #[test]
    fn a_word_outside_its_choices_is_reported_with_the_choices() {
        let e = errors(concat!(
            "[audit]\n",
            "on_full = \"wait\"\n",
            "[log]\n",
            "format = \"xml\"\n",
        ));
        assert_eq!(
            e,
            [
                "/etc/sealgate/test.toml:2: audit.on_full: `wait` is not \"block\" or \"drop\"",
                "/etc/sealgate/test.toml:4: log.format: `xml` is not \"text\" or \"json\"",
            ]
        );
        let c = parse(
            Path::new("x.toml"),
            "[audit]\non_full = \"drop\"\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        assert_eq!(c.audit.on_full, OnFull::Drop);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn datasource_names_are_single_safe_segments() {
        assert!(valid_datasource_name("payments-v2_eu"));
        for bad in ["", ".", "..", "-x", "a/b", "a.b", "a%2f"] {
            assert!(!valid_datasource_name(bad), "{bad}");
        }
        let e = errors("[datasources.\"a.b\"]\nurl = \"https://example.com\"\n");
        assert!(
            e[0].contains(":1: datasources.a.b: a data source name"),
            "{e:?}"
        );
    }

    #[test]
    fn ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not pem").unwrap();
        let text = "[datasources.a]\nurl = \"https://example.com\"\nca_file = \"ca.pem\"\n";
        let e = parse(&dir.path().join("c.toml"), text).err().unwrap();
        assert!(e.to_string().contains(":3: datasources.a.ca_file:"), "{e}");
        assert!(e.to_string().contains("no certificate found"), "{e}");
    }

    /// Configs as hands and editors damage them: a config that uses most
    /// sections, with lines dropped, doubled, cut or overwritten, and
    /// text that is not TOML at all. Parsing never panics, and every
    /// error names the file, with a line inside it where it gives one.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        const BASE: &str = concat!(
            "[proxy]\n",
            "listen = [\"127.0.0.1:6180\"]\n",
            "threads = 2\n",
            "grace_period_s = 5\n",
            "[admin]\n",
            "listen = \"127.0.0.1:9180\"\n",
            "[audit]\n",
            "output = \"stdout\"\n",
            "statements = \"fingerprint\"\n",
            "[postgres]\n",
            "listen = [\"127.0.0.1:6432\"]\n",
            "[mysql]\n",
            "listen = [\"127.0.0.1:3307\"]\n",
            "[datasources.api]\n",
            "url = \"https://api.example.com/v1\"\n",
            "timeout_ms = 3000\n",
            "scrub_responses = true\n",
            "credential = { kind = \"bearer\", token = \"sealed:v1:k1:x\" }\n",
            "[datasources.db]\n",
            "url = \"postgresql://db.example.com:5432/app\"\n",
            "sslmode = \"verify-full\"\n",
            "[callers.web]\n",
            "uid = 1000\n",
            "datasources = [\"api\", { name = \"db\", not_after = \"2030-01-01T00:00:00Z\" }]\n",
        );

        #[derive(Debug, Clone)]
        enum Damage {
            Drop(prop::sample::Index),
            Double(prop::sample::Index),
            Cut(prop::sample::Index, prop::sample::Index),
            Overwrite(prop::sample::Index, String),
        }

        fn damage() -> impl Strategy<Value = Damage> {
            prop_oneof![
                any::<prop::sample::Index>().prop_map(Damage::Drop),
                any::<prop::sample::Index>().prop_map(Damage::Double),
                (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                    .prop_map(|(l, at)| Damage::Cut(l, at)),
                (
                    any::<prop::sample::Index>(),
                    "[\\[\\]{}=\",.a-z0-9 _:\\\\-]{0,24}"
                )
                    .prop_map(|(l, text)| Damage::Overwrite(l, text)),
            ]
        }

        /// A policy file using each of its sections.
        const POLICY: &str = concat!(
            "[egress]\n",
            "allow = [\"api.example.com:443\", \"*.example.org\", \"203.0.113.0/24\"]\n",
            "allow_private = [\"10.0.0.0/8:5432\", \"[fd00::1]:443\"]\n",
            "[callers.web]\n",
            "unix_uid = 1000\n",
            "datasources = [\"api\", { name = \"db\", not_after = \"2030-01-01T00:00:00Z\" }]\n",
            "[callers.ci]\n",
            "token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "datasources = [\"api\"]\n",
        );

        fn damaged(base: &str, damages: &[Damage]) -> String {
            let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
            for d in damages {
                if lines.is_empty() {
                    break;
                }
                match d {
                    Damage::Drop(l) => {
                        lines.remove(l.index(lines.len()));
                    }
                    Damage::Double(l) => {
                        let l = l.index(lines.len());
                        let line = lines[l].clone();
                        lines.insert(l, line);
                    }
                    Damage::Cut(l, at) => {
                        let l = l.index(lines.len());
                        let line = &mut lines[l];
                        let at = at.index(line.len() + 1);
                        let at = (0..=at)
                            .rev()
                            .find(|&i| line.is_char_boundary(i))
                            .unwrap_or(0);
                        line.truncate(at);
                    }
                    Damage::Overwrite(l, text) => {
                        let l = l.index(lines.len());
                        lines[l] = text.clone();
                    }
                }
            }
            lines.join("\n")
        }

        fn judged(text: &str) -> Result<(), TestCaseError> {
            let file = "/etc/sealgate/test.toml";
            match parse(Path::new(file), text) {
                Ok(_) => Ok(()),
                Err(errors) => named(file, text, &errors.0),
            }
        }

        /// Every error names `file`, and a line inside `text` where it
        /// gives one.
        fn named(file: &str, text: &str, errors: &[ConfigError]) -> Result<(), TestCaseError> {
            let lines = text.lines().count() + 1;
            for e in errors.iter().map(ToString::to_string) {
                let Some(rest) = e.strip_prefix(file) else {
                    return Err(TestCaseError::fail(format!("no file in {e:?}")));
                };
                let line = rest
                    .strip_prefix(':')
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(line) = line {
                    prop_assert!(
                        line >= 1 && line <= lines,
                        "line {line} of {lines} in {e:?}"
                    );
                }
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn a_damaged_config_is_judged_with_its_file_and_line(
                damages in prop::collection::vec(damage(), 1..5),
            ) {
                judged(&damaged(BASE, &damages))?;
            }

            #[test]
            fn any_text_is_judged_as_a_config(text in any::<String>()) {
                judged(&text)?;
            }

            #[test]
            fn a_damaged_policy_file_is_judged_with_its_file_and_line(
                damages in prop::collection::vec(damage(), 1..5),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("team.toml");
                let text = damaged(POLICY, &damages);
                std::fs::write(&file, &text).unwrap();
                let datasources: std::collections::HashSet<&str> = ["api", "db"].into();
                if let Err(errors) = policy::load(dir.path(), &datasources) {
                    named(&file.display().to_string(), &text, &errors)?;
                }
            }

            #[test]
            fn any_egress_entry_is_judged(entry in any::<String>()) {
                let _ = crate::egress::parse_entry(&entry);
            }
        }
    }
}
