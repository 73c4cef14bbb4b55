//! The policy directory: every `*.toml` in it, merged into one egress
//! policy. Each entry remembers its file and line, which become the reason
//! a request was allowed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{ConfigError, ErrorSink};
use super::schema::RawPolicyFile;
use crate::callers::{parse_token_sha256, Caller, Callers};
use crate::egress::{parse_entry, EgressPolicy, Rule};

/// Everything the policy files say.
#[derive(Default)]
pub struct Policy {
    pub egress: EgressPolicy,
    pub callers: Callers,
    /// Grants whose `not_after` has already passed: `check` warns.
    pub expired_grants: Vec<ConfigError>,
}

/// Loads every policy file; grants are checked against `datasources`.
pub fn load(dir: &Path, datasources: &HashSet<&str>) -> Result<Policy, Vec<ConfigError>> {
    let files = policy_files(dir).map_err(|message| {
        vec![ConfigError {
            file: dir.to_path_buf(),
            line: None,
            key: "policy.dir".into(),
            message,
        }]
    })?;
    let mut policy = Policy::default();
    let mut tokens: HashSet<[u8; 32]> = HashSet::new();
    let mut errors = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(ConfigError {
                    file: file.clone(),
                    line: None,
                    key: "(file)".into(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let mut sink = ErrorSink::new(&file, &text);
        match toml::from_str::<RawPolicyFile>(&text) {
            Err(e) => sink.schema_errors::<RawPolicyFile>(&e),
            Ok(raw) => {
                let egress = raw.egress.as_ref();
                for (key, entries, into_private) in [
                    ("egress.allow", egress.map(|e| &e.allow), false),
                    (
                        "egress.allow_private",
                        egress.map(|e| &e.allow_private),
                        true,
                    ),
                ] {
                    for entry in entries.into_iter().flatten() {
                        match parse_entry(entry.get_ref()) {
                            Err(message) => sink.at(entry.span(), key, message),
                            Ok((target, ports)) => {
                                let line = sink.error_at(entry.span(), key, "").line.unwrap_or(0);
                                let rule = Arc::new(Rule::new(
                                    &format!("{}:{line}", file.display()),
                                    entry.get_ref(),
                                ));
                                let matcher = if into_private {
                                    &mut policy.egress.allow_private
                                } else {
                                    &mut policy.egress.allow
                                };
                                matcher.add(target, ports, rule);
                            }
                        }
                    }
                }
                load_callers(&raw, &mut sink, &mut policy, &mut tokens, datasources);
            }
        }
        if let Err(e) = sink.finish() {
            errors.extend(e.0);
        }
    }
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(errors)
    }
}

/// The `*.toml` files of `dir`, in name order so merges are repeatable.
/// A grant as written: a data source name, or a table with its `name`
/// and optional `not_after` (RFC 3339 in UTC, quoted or a TOML datetime).
fn grant(entry: &toml::Value) -> Result<(String, Option<u64>), String> {
    const FORM: &str =
        "a grant is a data source name, or { name = \"…\", not_after = \"YYYY-MM-DDTHH:MM:SSZ\" }";
    match entry {
        toml::Value::String(name) => Ok((name.clone(), None)),
        toml::Value::Table(table) => {
            if let Some(unknown) = table.keys().find(|k| *k != "name" && *k != "not_after") {
                return Err(format!("unknown key `{unknown}`: {FORM}"));
            }
            let Some(toml::Value::String(name)) = table.get("name") else {
                return Err(FORM.into());
            };
            let not_after = match table.get("not_after") {
                None => None,
                Some(toml::Value::String(text)) => Some(text.clone()),
                Some(toml::Value::Datetime(at)) => Some(at.to_string()),
                Some(_) => return Err(FORM.into()),
            };
            let not_after = match not_after {
                None => None,
                Some(text) => Some(crate::credentials::parse_utc(&text).ok_or_else(|| {
                    format!("not_after `{text}` is not a UTC time like 2026-12-31T23:59:59Z")
                })?),
            };
            Ok((name.clone(), not_after))
        }
        _ => Err(FORM.into()),
    }
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read policy directory {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn load_callers(
    raw: &RawPolicyFile,
    sink: &mut ErrorSink<'_>,
    policy: &mut Policy,
    tokens: &mut HashSet<[u8; 32]>,
    datasources: &HashSet<&str>,
) {
    let callers = &mut policy.callers;
    for (name, raw_caller) in &raw.callers {
        let key = |field: &str| format!("callers.{}.{field}", name.get_ref());
        if callers.iter().any(|c| c.name == *name.get_ref()) {
            sink.at(
                name.span(),
                format!("callers.{}", name.get_ref()),
                "defined in more than one policy file",
            );
            continue;
        }
        if raw_caller.token_sha256.is_none()
            && raw_caller.tls_identity.is_none()
            && raw_caller.unix_uid.is_none()
        {
            sink.at(
                name.span(),
                format!("callers.{}", name.get_ref()),
                "a caller needs an identity: tls_identity, unix_uid or token_sha256",
            );
            continue;
        }
        let token = match &raw_caller.token_sha256 {
            None => None,
            Some(raw_token) => match parse_token_sha256(raw_token.get_ref()) {
                Ok(digest) if tokens.insert(digest) => Some(digest),
                Ok(_) => {
                    sink.at(
                        raw_token.span(),
                        key("token_sha256"),
                        "the same token belongs to another caller",
                    );
                    continue;
                }
                Err(message) => {
                    sink.at(raw_token.span(), key("token_sha256"), message);
                    continue;
                }
            },
        };
        let tls_identity = raw_caller
            .tls_identity
            .as_ref()
            .map(|i| i.get_ref().clone());
        if let (Some(identity), Some(raw)) = (&tls_identity, &raw_caller.tls_identity) {
            if callers.by_tls_identity(identity).is_some() {
                sink.at(
                    raw.span(),
                    key("tls_identity"),
                    "the same identity belongs to another caller",
                );
                continue;
            }
        }
        let mut grants = std::collections::HashMap::new();
        for entry in &raw_caller.datasources {
            let (ds, not_after) = match grant(entry.get_ref()) {
                Ok(grant) => grant,
                Err(message) => {
                    sink.at(entry.span(), key("datasources"), message);
                    continue;
                }
            };
            if !datasources.contains(ds.as_str()) {
                sink.at(
                    entry.span(),
                    key("datasources"),
                    format!("no data source named \"{ds}\""),
                );
                continue;
            }
            let now = std::time::SystemTime::now();
            if not_after.is_some_and(|at| crate::callers::has_passed(at, now)) {
                policy.expired_grants.push(sink.error_at(
                    entry.span(),
                    key("datasources"),
                    format!("the grant of data source \"{ds}\" has already expired; requests are refused"),
                ));
            }
            grants.insert(ds, not_after);
        }
        let unix_uid = raw_caller.unix_uid.as_ref().map(|u| *u.get_ref());
        if let (Some(uid), Some(raw)) = (unix_uid, &raw_caller.unix_uid) {
            if callers.by_unix_uid(uid).is_some() {
                sink.at(
                    raw.span(),
                    key("unix_uid"),
                    "the same uid belongs to another caller",
                );
                continue;
            }
        }
        callers.insert(Caller::new(
            name.get_ref().clone(),
            grants,
            tls_identity,
            unix_uid,
            token,
        ));
    }
}
