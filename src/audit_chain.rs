//! The tamper-evident audit trail (SPEC 12): every line ends with an
//! HMAC-SHA256 over the previous line's value and its own bytes, under a
//! key derived from the primary master key. Whoever can write the audit
//! file but cannot read the key directory cannot alter, drop, reorder or
//! insert a line without `sealgate audit verify` naming where. Each file
//! sealgate opens (start, a logrotate reopen) begins with a `chain_start`
//! line naming the key and the value the chain continues from, so a
//! rotated series verifies as one chain, and lines under a retired key
//! verify while that key is still in the key directory.
//!
//! What a chain alone cannot show: whole lines removed from the end of the
//! newest file (nothing follows them to disagree). The next file's
//! `chain_start` shows it for every file but the newest.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secrets::Keyring;

/// The value before the first line sealgate ever wrote.
pub const GENESIS: [u8; 64] = [b'0'; 64];

/// `,"chain":"` + 64 hex + `"}`: how every chained line ends.
const MEMBER_PREFIX: &[u8] = b",\"chain\":\"";
const MEMBER_LEN: usize = MEMBER_PREFIX.len() + 64 + 2;

/// An audit line longer than this is not one sealgate wrote; `verify`
/// stops there instead of reading an unbounded line into memory.
const MAX_LINE: u64 = 1024 * 1024;

/// A chain key with the id of the master key it was derived from.
#[derive(Clone)]
pub struct ChainKey {
    pub id: String,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainKey({})", self.id)
    }
}

impl ChainKey {
    pub fn new(id: String, key: Zeroizing<[u8; 32]>) -> ChainKey {
        ChainKey { id, key }
    }

    /// HMAC-SHA256(key, prev ‖ "\n" ‖ line) as lower-case hex.
    fn link(&self, prev: &[u8; 64], line: &[u8]) -> [u8; 64] {
        // HMAC takes a key of any length: 32 bytes cannot be refused.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(prev);
        mac.update(b"\n");
        mac.update(line);
        hex64(&mac.finalize().into_bytes())
    }
}

fn hex64(digest: &[u8]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// The writer's side: the key in use and the last value written.
pub struct Chain {
    key: ChainKey,
    prev: [u8; 64],
}

impl Chain {
    /// A chain continuing from `prev` (the last value of the file being
    /// appended to, or `GENESIS`).
    pub fn new(key: ChainKey, prev: [u8; 64]) -> Chain {
        Chain { key, prev }
    }

    /// Where a restart continues the chain: the last value of the audit
    /// file it appends to, else the value last recorded beside it (the
    /// file was rotated away while sealgate was stopped), else `GENESIS`.
    pub fn resume_point(output: &Path) -> [u8; 64] {
        last_line_value(output)
            .or_else(|| {
                let recorded = std::fs::read(state_path(output)).ok()?;
                chain_value_hex(recorded.get(..64)?)
            })
            .unwrap_or(GENESIS)
    }

    /// The line (ending `}\n`, as `audit::encode` writes it) with its
    /// chain member added.
    pub fn extend(&mut self, line: &mut Vec<u8>) {
        let body_len = line.len().saturating_sub(1);
        let value = self.key.link(&self.prev, &line[..body_len]);
        line.truncate(body_len.saturating_sub(1));
        line.extend_from_slice(MEMBER_PREFIX);
        line.extend_from_slice(&value);
        line.extend_from_slice(b"\"}\n");
        self.prev = value;
    }

    pub fn prev(&self) -> [u8; 64] {
        self.prev
    }

    /// After lines sealgate itself dropped (`on_full = "drop"`, counted):
    /// the chain goes on from the last line the output took.
    pub fn resume_from(&mut self, prev: [u8; 64]) {
        self.prev = prev;
    }

    /// From the next `chain_start` on, lines are chained under `key`.
    pub fn rekey(&mut self, key: ChainKey) {
        self.key = key;
    }

    pub fn key_id(&self) -> &str {
        &self.key.id
    }
}

/// Where the writer records the last chain value it wrote, beside the
/// audit file (`audit.log.chain`: outside logrotate's usual `*.log`).
pub fn state_path(output: &Path) -> std::path::PathBuf {
    let mut path = output.as_os_str().to_owned();
    path.push(".chain");
    path.into()
}

fn last_line_value(path: &Path) -> Option<[u8; 64]> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.seek(SeekFrom::End(0)).ok()?;
    let tail_len = len.min(MEMBER_LEN as u64 + 1);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len)).ok()?;
    file.read_exact(&mut tail).ok()?;
    tail.strip_suffix(b"\n").and_then(chain_value)
}

fn chain_value_hex(value: &[u8]) -> Option<[u8; 64]> {
    let value: [u8; 64] = value.try_into().ok()?;
    value
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .then_some(value)
}

/// The chain value a written line ends with (the line without its
/// newline).
pub fn chain_value(line: &[u8]) -> Option<[u8; 64]> {
    let member = line.len().checked_sub(MEMBER_LEN).map(|at| &line[at..])?;
    chain_value_hex(member.strip_prefix(MEMBER_PREFIX)?.strip_suffix(b"\"}")?)
}

/// Where and why a series failed to verify.
#[derive(Debug)]
pub struct Broken {
    pub file: String,
    pub line: u64,
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.why)
    }
}

/// What a verified series held.
#[derive(Debug, Default)]
pub struct Verified {
    pub lines: u64,
    pub key_ids: Vec<String>,
    /// The first file continues a chain from a file not given.
    pub continues_earlier: bool,
}

/// Verifies `files`, in order, as one chain under the keys of `keyring`.
pub fn verify(keyring: &Keyring, files: &[&Path]) -> Result<Verified, Broken> {
    let mut verified = Verified::default();
    let mut prev: Option<[u8; 64]> = None;
    let mut key: Option<ChainKey> = None;
    for path in files {
        let name = path.display().to_string();
        let broken = |line: u64, why: String| Broken {
            file: name.clone(),
            line,
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| broken(0, e.to_string()))?;
        let mut reader = BufReader::new(file);
        let mut number = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(number + 1, e.to_string()))?;
            if read == 0 {
                break;
            }
            number += 1;
            let Some(text) = line.strip_suffix(b"\n") else {
                let why = if line.len() as u64 > MAX_LINE {
                    "the line is longer than any sealgate writes"
                } else {
                    "the last line is cut short (no newline): the file was truncated"
                };
                return Err(broken(number, why.into()));
            };
            let Some(value) = chain_value(text) else {
                return Err(broken(number, "the line has no chain value".into()));
            };
            let body_len = text.len() - MEMBER_LEN;
            let mut unchained = Vec::with_capacity(body_len + 1);
            unchained.extend_from_slice(&text[..body_len]);
            unchained.push(b'}');
            if let Some(start) = chain_start(&unchained) {
                let start = start.map_err(|why| broken(number, why))?;
                match prev {
                    Some(running) if running != start.prev => {
                        return Err(broken(
                            number,
                            "this chain_start does not continue from the line before it: \
                             lines were removed from the end of the previous file, or the \
                             files are out of order"
                                .into(),
                        ))
                    }
                    Some(_) => {}
                    None => verified.continues_earlier = start.prev != GENESIS,
                }
                prev = Some(start.prev);
                let next = keyring.chain_key(&start.key_id).ok_or_else(|| {
                    broken(
                        number,
                        format!(
                            "key id \"{}\" is not in the key directory: this part of the \
                             trail cannot be verified",
                            start.key_id
                        ),
                    )
                })?;
                if !verified.key_ids.contains(&next.id) {
                    verified.key_ids.push(next.id.clone());
                }
                key = Some(next);
            } else if number == 1 {
                return Err(broken(
                    number,
                    "the file does not begin with a chain_start line: lines were removed \
                     from its beginning"
                        .into(),
                ));
            }
            let (Some(key), Some(running)) = (&key, prev) else {
                return Err(broken(number, "no chain_start precedes this line".into()));
            };
            if key.link(&running, &unchained) != value {
                return Err(broken(
                    number,
                    "the chain breaks here: this line was altered, or a line before it \
                     was removed, reordered or inserted"
                        .into(),
                ));
            }
            prev = Some(value);
            verified.lines += 1;
        }
        if number == 0 {
            return Err(broken(
                0,
                "the file is empty: it lost its chain_start line".into(),
            ));
        }
    }
    Ok(verified)
}

struct ChainStart {
    key_id: String,
    prev: [u8; 64],
}

/// For a `chain_start` line, its key id and the value it continues from;
/// `None` for any other line.
fn chain_start(line: &[u8]) -> Option<Result<ChainStart, String>> {
    memchr::memmem::find(line, b"\"chain_start\"")?;
    #[derive(serde::Deserialize)]
    struct Fields {
        event: Option<String>,
        key_id: Option<String>,
        prev: Option<String>,
    }
    let fields: Fields = serde_json::from_slice(line).ok()?;
    if fields.event.as_deref() != Some("chain_start") {
        return None;
    }
    let start = (|| {
        let prev: [u8; 64] = fields.prev?.into_bytes().try_into().ok()?;
        Some(ChainStart {
            key_id: fields.key_id?,
            prev,
        })
    })();
    Some(start.ok_or_else(|| "a chain_start line without a key_id and prev".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain value is SPEC 12's HMAC, computed here independently.
    #[test]
    fn a_line_is_chained_as_the_spec_says() {
        let key = ChainKey::new("k1".into(), Zeroizing::new([7u8; 32]));
        let mut chain = Chain::new(key, GENESIS);
        let mut line = b"{\"ts\":\"x\",\"status\":200}\n".to_vec();
        chain.extend(&mut line);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(&[b'0'; 64]);
        mac.update(b"\n{\"ts\":\"x\",\"status\":200}");
        let expected = hex64(&mac.finalize().into_bytes());
        let mut want = b"{\"ts\":\"x\",\"status\":200,\"chain\":\"".to_vec();
        want.extend_from_slice(&expected);
        want.extend_from_slice(b"\"}\n");
        assert_eq!(line, want);
        assert_eq!(chain.prev(), expected);
        assert_eq!(chain_value(&line[..line.len() - 1]), Some(expected));
        assert_eq!(chain_value(b"{\"chain\":\"xyz\"}"), None);
    }

    #[test]
    fn debug_shows_no_key() {
        let key = ChainKey::new("k1".into(), Zeroizing::new([0xab; 32]));
        assert_eq!(format!("{key:?}"), "ChainKey(k1)");
    }

    /// Files that are not a chain: any lines, and lines that look like
    /// records with chain members. `verify` reads them without panic and
    /// never calls them verified.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn line() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..80),
                ("[a-z_\":,{} 0-9]{0,40}", "[0-9a-f]{0,66}").prop_map(|(body, chain)| {
                    format!("{{{body},\"chain\":\"{chain}\"}}").into_bytes()
                }),
                "[0-9a-f]{64}".prop_map(|chain| {
                    format!("{{\"event\":\"chain_start\",\"key_id\":\"k1\",\"prev\":\"{chain}\",\"chain\":\"{chain}\"}}").into_bytes()
                }),
            ]
        }

        proptest! {
            #[test]
            fn a_file_that_is_no_chain_is_never_verified(
                lines in prop::collection::vec(line(), 1..8),
            ) {
                prop_assume!(lines.iter().flatten().any(|b| !b.is_ascii_whitespace()));
                let dir = tempfile::tempdir().unwrap();
                let keys = crate::secrets::tests::shared_keyring();
                let file = dir.path().join("audit.log");
                std::fs::write(&file, lines.join(&b'\n')).unwrap();
                prop_assert!(verify(keys, &[&file]).is_err());
            }
        }
    }
}
