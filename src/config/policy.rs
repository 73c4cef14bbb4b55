//! The policy directory: every `*.toml` in it, merged into one egress
//! policy. Each entry remembers its file and line, which become the reason
//! a request was allowed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{ConfigError, ErrorSink};
use super::schema::RawPolicyFile;
use crate::egress::{parse_entry, EgressPolicy, Rule};

pub fn load(dir: &Path) -> Result<EgressPolicy, Vec<ConfigError>> {
    let files = policy_files(dir).map_err(|message| {
        vec![ConfigError {
            file: dir.to_path_buf(),
            line: None,
            key: "policy.dir".into(),
            message,
        }]
    })?;
    let mut policy = EgressPolicy::default();
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
            Err(e) => sink.toml_error(&e),
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
                                let rule = Arc::new(Rule {
                                    source: format!("{}:{line}", file.display()),
                                    entry: entry.get_ref().clone(),
                                });
                                let matcher = if into_private {
                                    &mut policy.allow_private
                                } else {
                                    &mut policy.allow
                                };
                                matcher.add(target, ports, rule);
                            }
                        }
                    }
                }
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
