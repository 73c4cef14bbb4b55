//! Key and sealed-value commands: `keygen`, `salt`, `seal`, `reseal`.
//! Plaintext comes from stdin only (argv is visible to every local user in
//! /proc), and nothing here ever prints a key or a plaintext.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::config;
use crate::secrets::{self, valid_key_id, Keyring, Secret, SECRET_FIELDS};

/// A secret larger than this is not a credential.
const MAX_SECRET_LEN: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeytoolError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Seal(#[from] secrets::SealError),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> KeytoolError {
    KeytoolError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Writes a new master key to `out` (mode 0600), never over an existing file.
pub fn keygen(out: &Path) -> Result<String, KeytoolError> {
    let id = out
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".key"))
        .filter(|id| valid_key_id(id))
        .ok_or_else(|| {
            file_error(
                out,
                "name the file <key-id>.key (key id: letters, digits, '-', '_')",
            )
        })?;
    let key = secrets::new_master_key()?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                file_error(out, "already exists; refusing to overwrite a key")
            }
            _ => file_error(out, e),
        })?;
    file.write_all(key.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| file_error(out, e))?;
    Ok(format!(
        "wrote a new 256-bit key to {} (key id \"{id}\")",
        out.display()
    ))
}

/// Seals a secret read from `input` for one data source and field.
pub fn seal(
    config_path: &Path,
    datasource: &str,
    field: &str,
    input: impl Read,
) -> Result<String, KeytoolError> {
    if !secrets::valid_field_path(field) {
        return Err(KeytoolError::Input(format!(
            "--field must be one of {}, or {}.<caller>.<one of them>",
            SECRET_FIELDS.join(", "),
            secrets::CALLER_CREDENTIALS
        )));
    }
    if !config::valid_datasource_name(datasource) {
        return Err(KeytoolError::Input(format!(
            "`{datasource}` is not a valid data source name"
        )));
    }
    let keyring = config::load_keyring(config_path)?;
    let secret = read_secret(input)?;
    Ok(keyring.seal(datasource, field, &secret)?)
}

fn read_secret(input: impl Read) -> Result<Secret, KeytoolError> {
    let mut raw = Zeroizing::new(Vec::new());
    input
        .take(MAX_SECRET_LEN + 1)
        .read_to_end(&mut raw)
        .map_err(|e| KeytoolError::Input(format!("reading the secret from stdin: {e}")))?;
    if raw.len() as u64 > MAX_SECRET_LEN {
        return Err(KeytoolError::Input(format!(
            "the secret is over {MAX_SECRET_LEN} bytes"
        )));
    }
    // `echo secret | sealgate seal` and a here-string add one line ending.
    let trimmed = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(&raw);
    let text = std::str::from_utf8(trimmed)
        .map_err(|_| KeytoolError::Input("the secret is not UTF-8 text".into()))?;
    Secret::new(Zeroizing::new(text.to_string())).map_err(|e| KeytoolError::Input(e.into()))
}

pub struct ResealReport {
    pub resealed: usize,
    pub already_primary: usize,
    pub primary: String,
}

/// Re-encrypts every sealed value not under the primary key, rewriting the
/// file atomically with its comments and layout kept.
pub fn reseal(config_path: &Path) -> Result<ResealReport, KeytoolError> {
    let keyring = config::load_keyring(config_path)?;
    let text = std::fs::read_to_string(config_path).map_err(|e| file_error(config_path, e))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| file_error(config_path, e))?;
    let mut report = ResealReport {
        resealed: 0,
        already_primary: 0,
        primary: keyring.primary().to_string(),
    };
    let places = sealed_places(&doc);
    let place_refs: Vec<(&str, &str)> = places
        .iter()
        .map(|(d, f)| (d.as_str(), f.as_str()))
        .collect();
    for (datasource, field) in &places {
        let Some(value) = sealed_value_mut(&mut doc, datasource, field) else {
            continue;
        };
        let Some(envelope) = value.as_str().map(str::to_string) else {
            continue;
        };
        if Keyring::key_id_of(&envelope) == Some(keyring.primary()) {
            report.already_primary += 1;
            continue;
        }
        let secret = keyring
            .open(datasource, field, &envelope, &place_refs)
            .map_err(|e| {
                KeytoolError::Input(format!(
                    "{}: sealed value {e}",
                    secrets::field_key(datasource, field)
                ))
            })?;
        let decor = value.decor().clone();
        *value = toml_edit::Value::from(keyring.seal(datasource, field, &secret)?);
        *value.decor_mut() = decor;
        report.resealed += 1;
    }
    if report.resealed > 0 {
        write_atomically(config_path, doc.to_string().as_bytes())?;
    }
    Ok(report)
}

/// (data source, field path) of every sealed value in the document: the
/// data source's credential and each caller's (SPEC section 8).
fn sealed_places(doc: &toml_edit::DocumentMut) -> Vec<(String, String)> {
    let Some(datasources) = doc.get("datasources").and_then(|d| d.as_table_like()) else {
        return Vec::new();
    };
    let mut places = Vec::new();
    for (name, item) in datasources.iter() {
        let mut credentials: Vec<(Option<&str>, &dyn toml_edit::TableLike)> = Vec::new();
        if let Some(own) = item.get("credential").and_then(|c| c.as_table_like()) {
            credentials.push((None, own));
        }
        let per_caller = item
            .get(secrets::CALLER_CREDENTIALS)
            .and_then(|c| c.as_table_like());
        for (caller, credential) in per_caller.into_iter().flat_map(|t| t.iter()) {
            if let Some(credential) = credential.as_table_like() {
                credentials.push((Some(caller), credential));
            }
        }
        for (caller, credential) in credentials {
            for field in SECRET_FIELDS {
                let sealed = credential
                    .get(field)
                    .and_then(|v| v.as_str())
                    .is_some_and(|s| s.starts_with(secrets::SEALED_PREFIX));
                if sealed {
                    places.push((name.to_string(), secrets::field_path(caller, field)));
                }
            }
        }
    }
    places
}

fn sealed_value_mut<'d>(
    doc: &'d mut toml_edit::DocumentMut,
    datasource: &str,
    path: &str,
) -> Option<&'d mut toml_edit::Value> {
    let mut item = doc
        .get_mut("datasources")?
        .as_table_like_mut()?
        .get_mut(datasource)?;
    let parts: Vec<&str> = path.split('.').collect();
    let (field, tables) = parts.split_last()?;
    if tables.is_empty() {
        item = item.as_table_like_mut()?.get_mut("credential")?;
    }
    for table in tables {
        item = item.as_table_like_mut()?.get_mut(table)?;
    }
    item.as_table_like_mut()?.get_mut(field)?.as_value_mut()
}

/// Replaces `path` with `contents` so that a crash leaves either the old or
/// the new file, never half of one; the file keeps its permissions.
/// Replaces the file `path` names, through any symlinks (a config linked
/// from a deployment's checkout stays linked, and its target is what
/// changes), keeping the target's owner and mode.
fn write_atomically(link: &Path, contents: &[u8]) -> Result<(), KeytoolError> {
    use std::os::unix::fs::MetadataExt;
    let path = &std::fs::canonicalize(link).map_err(|e| file_error(link, e))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
    let mode = meta.permissions().mode();
    let owner = (
        Some(nix::unistd::Uid::from_raw(meta.uid())),
        Some(nix::unistd::Gid::from_raw(meta.gid())),
    );
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("config");
    let tmp = dir.join(format!(".{name}.reseal-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&tmp)?;
        nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&file), owner.0, owner.1)?;
        // The umask may have taken bits away at creation.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| file_error(path, e))
}
