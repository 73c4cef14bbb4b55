//! Sealed values (SPEC section 5): the keyring read from the key directory,
//! and AES-256-GCM envelopes bound to one data source and field.
//!
//! Unlike the seeds' AES-CBC with a public default salt, an envelope is
//! authenticated (a flipped bit does not open), keyed per instance (data key
//! = HKDF-SHA256 of the master key and this instance's salt), names its key
//! (so keys rotate), and is bound to where it is used (associated data names
//! the data source and field, so a copied envelope does not open).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hkdf::Hkdf;

use crate::audit_chain::ChainKey;
use sha2::Sha256;
use zeroize::Zeroizing;

pub const SEALED_PREFIX: &str = "sealed:";
const ENVELOPE_V1: &str = "sealed:v1:";
const DATA_KEY_INFO: &[u8] = b"sealgate v1 data key";
const AUDIT_CHAIN_INFO: &[u8] = b"sealgate v1 audit chain";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const MIN_SALT_LEN: usize = 16;
/// A salt with fewer distinct byte values than this was not drawn at
/// random (all zeros, one byte repeated, a short pattern): 16 random bytes
/// have fewer than 8 distinct values with odds below one in 10^9.
const MIN_SALT_DISTINCT_BYTES: usize = 8;
pub const KEY_LEN: usize = 32;
/// The secret fields a credential can have; `seal --field` takes one.
pub const SECRET_FIELDS: [&str; 7] = [
    "token",
    "password",
    "value",
    "client_secret",
    "access_key_id",
    "secret_access_key",
    "session_token",
];
/// Where per-caller credentials of a data source live (SPEC section 8).
pub const CALLER_CREDENTIALS: &str = "caller_credentials";

/// The field path an envelope is sealed for: `password` for the data
/// source's own credential, `caller_credentials.<caller>.password` for a
/// caller's. Part of the associated data, so an envelope copied to another
/// caller does not open.
pub fn field_path(caller: Option<&str>, field: &str) -> String {
    match caller {
        None => field.to_string(),
        Some(caller) => format!("{CALLER_CREDENTIALS}.{caller}.{field}"),
    }
}

/// Whether `seal --field` names a place a credential can hold a secret.
pub fn valid_field_path(path: &str) -> bool {
    match path.split('.').collect::<Vec<_>>().as_slice() {
        [field] => SECRET_FIELDS.contains(field),
        [CALLER_CREDENTIALS, caller, field] => !caller.is_empty() && SECRET_FIELDS.contains(field),
        _ => false,
    }
}

/// The config key of a sealed value, for messages.
pub fn field_key(datasource: &str, path: &str) -> String {
    if path.starts_with(CALLER_CREDENTIALS) {
        format!("datasources.{datasource}.{path}")
    } else {
        format!("datasources.{datasource}.credential.{path}")
    }
}

/// A plaintext secret. Zeroed when dropped; never printed.
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Refuses what could not travel safely in a header or query: empty
    /// values and control characters (a CR or LF would split the request).
    pub fn new(text: Zeroizing<String>) -> Result<Secret, &'static str> {
        if text.is_empty() {
            return Err("the secret is empty");
        }
        if text.chars().any(char::is_control) {
            return Err("the secret contains control characters (CR, LF, tab or other)");
        }
        Ok(Secret(text))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("salt is not valid base64")]
    SaltEncoding,
    #[error(
        "salt is {0} bytes; at least {MIN_SALT_LEN} are required (make one with `sealgate salt`)"
    )]
    SaltTooShort(usize),
    #[error("salt has only {0} distinct byte values: it was not made at random (make one with `sealgate salt`)")]
    SaltDegenerate(usize),
    #[error("cannot read key directory {0}: {1}")]
    Dir(PathBuf, String),
    #[error("cannot read key file {0}: {1}")]
    File(PathBuf, String),
    #[error("key file {0} is readable or writable by others, or writable by its group (mode {1:o}); chmod 600 (or 640)")]
    Permissions(PathBuf, u32),
    #[error("key file {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{0} is owned by uid {1}, neither root nor the user sealgate runs as: its owner could replace the keys")]
    Owner(PathBuf, u32),
    #[error("key directory {0} is writable by its group or others (mode {1:o}), who could replace a key; chmod go-w, or mount it read-only")]
    DirPermissions(PathBuf, u32),
    #[error("key file {0} must hold {KEY_LEN} bytes in base64; it holds {1}")]
    KeyLength(PathBuf, usize),
    #[error("key file {0} is not valid base64")]
    KeyEncoding(PathBuf),
    #[error("key file name {0} is not <key-id>.key with a key id of letters, digits, '-' or '_'")]
    KeyId(PathBuf),
    #[error("primary key \"{0}\" has no file {0}.key in {1}")]
    NoPrimary(String, PathBuf),
}

/// The data keys of one instance, by key id.
pub struct Keyring {
    ciphers: BTreeMap<String, Aes256Gcm>,
    /// The audit chain's key under each master key (SPEC 12).
    chain_keys: BTreeMap<String, ChainKey>,
    primary: String,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .field("primary", &self.primary)
            .finish()
    }
}

pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Keyring {
    /// Reads every `<key-id>.key` in `dir`, refusing keys that others could
    /// read or anyone but the owner could change. Group read stays allowed
    /// for Kubernetes Secret volumes mounted with an fsGroup.
    pub fn load(dir: &Path, primary: &str, salt_b64: &str) -> Result<Keyring, KeyringError> {
        let salt = Zeroizing::new(
            STANDARD
                .decode(salt_b64.trim())
                .map_err(|_| KeyringError::SaltEncoding)?,
        );
        if salt.len() < MIN_SALT_LEN {
            return Err(KeyringError::SaltTooShort(salt.len()));
        }
        let distinct = salt.iter().collect::<std::collections::BTreeSet<_>>().len();
        if distinct < MIN_SALT_DISTINCT_BYTES {
            return Err(KeyringError::SaltDegenerate(distinct));
        }
        check_key_dir(dir)?;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| KeyringError::Dir(dir.to_path_buf(), e.to_string()))?;
        let mut ciphers = BTreeMap::new();
        let mut chain_keys = BTreeMap::new();
        for entry in entries {
            let path = entry
                .map_err(|e| KeyringError::Dir(dir.to_path_buf(), e.to_string()))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("key") {
                continue;
            }
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| valid_key_id(s))
                .ok_or_else(|| KeyringError::KeyId(path.clone()))?
                .to_string();
            let master = read_key_file(&path)?;
            ciphers.insert(id.clone(), cipher_for(&master, &salt));
            let mut chain_key = Zeroizing::new([0u8; KEY_LEN]);
            // HKDF-SHA256 can expand up to 8160 bytes; 32 can never fail.
            let _ = Hkdf::<Sha256>::new(Some(&salt), master.as_ref())
                .expand(AUDIT_CHAIN_INFO, chain_key.as_mut());
            chain_keys.insert(id.clone(), ChainKey::new(id, chain_key));
        }
        if !ciphers.contains_key(primary) {
            return Err(KeyringError::NoPrimary(
                primary.to_string(),
                dir.to_path_buf(),
            ));
        }
        Ok(Keyring {
            ciphers,
            chain_keys,
            primary: primary.to_string(),
        })
    }

    pub fn key_ids(&self) -> Vec<&str> {
        self.ciphers.keys().map(String::as_str).collect()
    }

    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// The audit chain key derived from master key `id`.
    pub fn chain_key(&self, id: &str) -> Option<ChainKey> {
        self.chain_keys.get(id).cloned()
    }

    /// Seals `plaintext` for one data source and field under the primary key.
    pub fn seal(
        &self,
        datasource: &str,
        field: &str,
        plaintext: &Secret,
    ) -> Result<String, SealError> {
        let cipher = self
            .ciphers
            .get(&self.primary)
            .ok_or(SealError::NoPrimary)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| SealError::Random)?;
        let aad = associated_data(datasource, field);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Encrypt)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!(
            "{ENVELOPE_V1}{}:{}",
            self.primary,
            URL_SAFE_NO_PAD.encode(blob)
        ))
    }

    /// Opens an envelope sealed for `datasource` and `field`. When it does
    /// not open, `elsewhere` (other places envelopes are used in this
    /// config) is tried to tell a copied envelope from a damaged one.
    pub fn open(
        &self,
        datasource: &str,
        field: &str,
        envelope: &str,
        elsewhere: &[(&str, &str)],
    ) -> Result<Secret, OpenError> {
        let parsed = Envelope::parse(envelope)?;
        let cipher = self
            .ciphers
            .get(parsed.key_id)
            .ok_or_else(|| OpenError::UnknownKey(parsed.key_id.to_string()))?;
        let attempt = |ds: &str, f: &str| {
            let aad = associated_data(ds, f);
            cipher
                .decrypt(
                    Nonce::from_slice(&parsed.blob[..NONCE_LEN]),
                    Payload {
                        msg: &parsed.blob[NONCE_LEN..],
                        aad: &aad,
                    },
                )
                .ok()
                .map(Zeroizing::new)
        };
        let Some(plain) = attempt(datasource, field) else {
            let moved = elsewhere
                .iter()
                .find(|(ds, f)| (*ds, *f) != (datasource, field) && attempt(ds, f).is_some());
            return Err(match moved {
                Some((ds, f)) => OpenError::SealedForElsewhere {
                    datasource: ds.to_string(),
                    field: f.to_string(),
                },
                None => OpenError::DoesNotOpen(parsed.key_id.to_string()),
            });
        };
        // Checked in place: a failed String::from_utf8 would drop its copy
        // of the plaintext unwiped.
        let text = std::str::from_utf8(&plain).map_err(|_| OpenError::NotText)?;
        Secret::new(Zeroizing::new(text.to_owned())).map_err(OpenError::Unusable)
    }

    /// The key id an envelope names, if it parses.
    pub fn key_id_of(envelope: &str) -> Option<&str> {
        Envelope::parse(envelope).ok().map(|e| e.key_id)
    }
}

fn cipher_for(master: &[u8; KEY_LEN], salt: &[u8]) -> Aes256Gcm {
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    // HKDF-SHA256 can expand up to 8160 bytes; 32 can never fail.
    let _ = Hkdf::<Sha256>::new(Some(salt), master).expand(DATA_KEY_INFO, data_key.as_mut());
    Aes256Gcm::new(data_key.as_ref().into())
}

/// Whoever owns or may write to a key directory can replace a key before
/// the next `reseal` and then open every credential: only root or the
/// user sealgate runs as may own it, and no one else may write to it
/// (unless it is on a read-only mount, as a Kubernetes Secret volume is).
fn check_key_dir(dir: &Path) -> Result<(), KeyringError> {
    let meta =
        std::fs::metadata(dir).map_err(|e| KeyringError::Dir(dir.to_path_buf(), e.to_string()))?;
    if !meta.is_dir() {
        return Err(KeyringError::Dir(
            dir.to_path_buf(),
            "not a directory".to_string(),
        ));
    }
    check_owner(dir, &meta)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 && !on_read_only_mount(dir) {
        return Err(KeyringError::DirPermissions(dir.to_path_buf(), mode));
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyringError> {
    use std::os::unix::fs::MetadataExt;
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(KeyringError::Owner(path.to_path_buf(), uid));
    }
    Ok(())
}

fn on_read_only_mount(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Opened without blocking and judged by what was opened: a FIFO named like
/// a key would make the read wait forever, and a file swapped between a
/// check and the open would escape the check. A symlink (as in a Secret
/// volume) is judged by its target, and the target's directory like the
/// key directory.
fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyringError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file_error = |e: std::io::Error| KeyringError::File(path.to_path_buf(), e.to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(file_error)?;
    let meta = file.metadata().map_err(file_error)?;
    if !meta.is_file() {
        return Err(KeyringError::NotAFile(path.to_path_buf()));
    }
    check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(KeyringError::Permissions(path.to_path_buf(), mode));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        let target = std::fs::canonicalize(path).map_err(file_error)?;
        if let Some(target_dir) = target.parent() {
            check_key_dir(target_dir)?;
        }
    }
    // Sized up front so the text never moves and leaves an unwiped copy;
    // a key is 44 characters of base64, so anything near the cap is wrong.
    const MAX_KEY_FILE: u64 = 1024;
    let mut text = Zeroizing::new(String::with_capacity(MAX_KEY_FILE as usize + 1));
    file.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(file_error)?;
    let bytes = Zeroizing::new(
        STANDARD
            .decode(text.trim())
            .map_err(|_| KeyringError::KeyEncoding(path.to_path_buf()))?,
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(KeyringError::KeyLength(path.to_path_buf(), bytes.len()));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

fn associated_data(datasource: &str, field: &str) -> Vec<u8> {
    format!("sealgate v1|{datasource}|{field}").into_bytes()
}

/// A fresh 256-bit master key, base64.
pub fn new_master_key() -> Result<Zeroizing<String>, SealError> {
    random_b64(KEY_LEN)
}

/// A fresh 32-byte instance salt, base64.
pub fn new_salt() -> Result<String, SealError> {
    random_b64(32).map(|s| s.to_string())
}

fn random_b64(len: usize) -> Result<Zeroizing<String>, SealError> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    getrandom::getrandom(&mut bytes).map_err(|_| SealError::Random)?;
    Ok(Zeroizing::new(STANDARD.encode(&*bytes)))
}

struct Envelope<'a> {
    key_id: &'a str,
    blob: Vec<u8>,
}

impl<'a> Envelope<'a> {
    fn parse(text: &'a str) -> Result<Envelope<'a>, OpenError> {
        let rest = match text.strip_prefix(ENVELOPE_V1) {
            Some(rest) => rest,
            None if text.starts_with(SEALED_PREFIX) => return Err(OpenError::Version),
            None => return Err(OpenError::Plaintext),
        };
        let (key_id, b64) = rest.split_once(':').ok_or(OpenError::Malformed)?;
        if !valid_key_id(key_id) {
            return Err(OpenError::Malformed);
        }
        let blob = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| OpenError::Malformed)?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        Ok(Envelope { key_id, blob })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "holds a plaintext secret; seal it with `sealgate seal` and use the sealed:v1:… value"
    )]
    Plaintext,
    #[error("is a sealed value of an unsupported version (this sealgate reads sealed:v1)")]
    Version,
    #[error("is not a well-formed sealed:v1:<key-id>:<data> value")]
    Malformed,
    #[error("is sealed under key \"{0}\", which is not in the key directory")]
    UnknownKey(String),
    #[error("was sealed for data source \"{datasource}\", field \"{field}\"; an envelope only opens where it was sealed for (seal it again for this place)")]
    SealedForElsewhere { datasource: String, field: String },
    #[error("does not open with key \"{0}\": it was altered, or sealed for another data source or field, or with a different key under the same id")]
    DoesNotOpen(String),
    #[error("opened, but is not UTF-8 text")]
    NotText,
    #[error("opened, but {0}")]
    Unusable(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the operating system's random source failed")]
    Random,
    #[error("the primary key is missing")]
    NoPrimary,
    #[error("encryption failed")]
    Encrypt,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One keyring (primary key `k1`) for properties that run many cases,
    /// built once: a key file per case spent more time in the file system
    /// than in the property. Its key file is only read while loading.
    pub(crate) fn shared_keyring() -> &'static Keyring {
        static KEYRING: std::sync::OnceLock<Keyring> = std::sync::OnceLock::new();
        KEYRING.get_or_init(|| keyring_with(&["k1"], "k1").1)
    }

    fn keyring_with(ids: &[&str], primary: &str) -> (tempfile::TempDir, Keyring) {
        let dir = tempfile::tempdir().unwrap();
        for id in ids {
            let path = dir.path().join(format!("{id}.key"));
            std::fs::write(&path, new_master_key().unwrap().as_str()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let k = Keyring::load(dir.path(), primary, &new_salt().unwrap()).unwrap();
        (dir, k)
    }

    fn secret(s: &str) -> Secret {
        Secret::new(Zeroizing::new(s.to_string())).unwrap()
    }

    #[test]
    fn round_trip_under_the_primary_key() {
        let (_d, k) = keyring_with(&["k1", "k2"], "k2");
        let env = k.seal("pay", "token", &secret("tok-123")).unwrap();
        assert!(env.starts_with("sealed:v1:k2:"));
        assert_eq!(
            k.open("pay", "token", &env, &[]).unwrap().expose(),
            "tok-123"
        );
        assert_ne!(
            env,
            k.seal("pay", "token", &secret("tok-123")).unwrap(),
            "fresh nonce each time"
        );
    }

    #[test]
    fn each_way_of_failing_has_its_own_error() {
        let (_d, k) = keyring_with(&["k1"], "k1");
        let env = k.seal("pay", "token", &secret("tok")).unwrap();
        assert_eq!(
            k.open("crm", "token", &env, &[("pay", "token"), ("crm", "token")])
                .err(),
            Some(OpenError::SealedForElsewhere {
                datasource: "pay".into(),
                field: "token".into()
            })
        );
        assert_eq!(
            k.open("pay", "password", &env, &[]).err(),
            Some(OpenError::DoesNotOpen("k1".into()))
        );

        let (prefix, data) = env.rsplit_once(':').unwrap();
        let mut blob = URL_SAFE_NO_PAD.decode(data).unwrap();
        blob[20] ^= 1;
        let flipped = format!("{prefix}:{}", URL_SAFE_NO_PAD.encode(blob));
        assert_eq!(
            k.open("pay", "token", &flipped, &[("pay", "token")]).err(),
            Some(OpenError::DoesNotOpen("k1".into()))
        );

        let other_key = env.replacen("sealed:v1:k1:", "sealed:v1:k9:", 1);
        assert_eq!(
            k.open("pay", "token", &other_key, &[]).err(),
            Some(OpenError::UnknownKey("k9".into()))
        );
        assert_eq!(
            k.open("pay", "token", "hunter2", &[]).err(),
            Some(OpenError::Plaintext)
        );
        assert_eq!(
            k.open("pay", "token", "sealed:v2:k1:abc", &[]).err(),
            Some(OpenError::Version)
        );
        assert_eq!(
            k.open("pay", "token", "sealed:v1:k1:!!", &[]).err(),
            Some(OpenError::Malformed)
        );
    }

    #[test]
    fn secrets_with_control_characters_are_refused() {
        let (_d, k) = keyring_with(&["k1"], "k1");
        assert!(Secret::new(Zeroizing::new("a\r\nX-Evil: 1".into())).is_err());
        // An envelope made elsewhere around such a value still does not get in.
        let raw = Secret(Zeroizing::new("a\nb".into()));
        let env = k.seal("pay", "token", &raw).unwrap();
        assert!(matches!(
            k.open("pay", "token", &env, &[]),
            Err(OpenError::Unusable(_))
        ));
    }

    #[test]
    fn keyring_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let salt = new_salt().unwrap();
        let path = dir.path().join("k1.key");
        std::fs::write(&path, new_master_key().unwrap().as_str()).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                Keyring::load(dir.path(), "k1", &salt).is_ok(),
                ok,
                "mode {mode:o}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Keyring::load(dir.path(), "k1", "c2hvcnQ="),
            Err(KeyringError::SaltTooShort(5))
        ));
        assert!(matches!(
            Keyring::load(dir.path(), "k2", &salt),
            Err(KeyringError::NoPrimary(..))
        ));
        std::fs::write(&path, STANDARD.encode([1u8; 16])).unwrap();
        assert!(matches!(
            Keyring::load(dir.path(), "k1", &salt),
            Err(KeyringError::KeyLength(_, 16))
        ));
    }

    #[test]
    fn debug_never_shows_key_material_or_plaintext() {
        let (_d, k) = keyring_with(&["k1"], "k1");
        assert_eq!(format!("{:?}", secret("tok-123")), "Secret([redacted])");
        let dbg = format!("{k:?}");
        assert!(dbg.contains("k1") && !dbg.contains("cipher"), "{dbg}");
    }

    /// Envelopes as typed, pasted or damaged: nothing but a whole,
    /// unchanged envelope opens, and nothing panics on the way.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_text_is_refused_as_an_envelope(
                text in prop_oneof![any::<String>(), "sealed:v1:k1:[A-Za-z0-9_=:+/-]{0,80}"],
            ) {
                let k = shared_keyring();
                prop_assert!(k.open("pay", "token", &text, &[("pay", "other")]).is_err());
            }

            #[test]
            fn a_changed_envelope_never_opens(
                plain in "[ -~]{1,40}",
                at in any::<prop::sample::Index>(),
                to in "[A-Za-z0-9_:-]",
            ) {
                let k = shared_keyring();
                let envelope = k.seal("pay", "token", &secret(&plain)).unwrap();
                let at = at.index(envelope.len());
                let changed = format!("{}{}{}", &envelope[..at], to, &envelope[at + 1..]);
                let opened = k.open("pay", "token", &changed, &[]);
                if changed == envelope {
                    let opened = opened.unwrap();
                    prop_assert_eq!(opened.expose(), plain.as_str());
                } else {
                    prop_assert!(opened.is_err(), "{changed} opened");
                }
            }
        }
    }
}
