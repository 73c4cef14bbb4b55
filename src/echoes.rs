//! Every form in which an injected secret could come back from a data
//! source and still be read by the caller. An upstream that echoes what it
//! was sent (debug endpoints, error pages that quote headers) can hand the
//! credential back in any part of a response head, in a form a client
//! decodes: another letter case, hex, base64 (standard or URL-safe, padded
//! or not, at any alignment inside a longer encoded string),
//! percent-encoding (either hex case, `+` for space). The forms are made
//! once, when the credential is opened, and held in zeroizing memory.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use zeroize::Zeroizing;

/// What a response header value echoing the credential shows instead.
pub const REDACTED: &str = "[redacted]";

/// A derived form shorter than this would match ordinary text; the secret
/// itself is always looked for, however short.
const MIN_DERIVED_FORM: usize = 4;

/// How many layers of percent-encoding are undone: a client or framework
/// that decodes twice is common, three times is not.
const PERCENT_LAYERS: usize = 3;

pub struct Echoes {
    forms: Vec<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Echoes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Echoes({} forms)", self.forms.len())
    }
}

impl Echoes {
    /// `roots` are the values on the wire that carry the secret (the
    /// secret itself, and for example the whole `Authorization` value).
    pub fn of(roots: &[&[u8]]) -> Echoes {
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut add = |form: Zeroizing<Vec<u8>>, derived: bool| {
            let long_enough = !form.is_empty() && (!derived || form.len() >= MIN_DERIVED_FORM);
            if long_enough && !forms.iter().any(|f| f.eq_ignore_ascii_case(&form)) {
                forms.push(form);
            }
        };
        for root in roots {
            add(Zeroizing::new(root.to_vec()), false);
            add(hex(root), true);
            for aligned in base64_at_every_alignment(root) {
                let url_safe = Zeroizing::new(
                    aligned
                        .iter()
                        .map(|&b| match b {
                            b'+' => b'-',
                            b'/' => b'_',
                            other => other,
                        })
                        .collect(),
                );
                add(aligned, true);
                add(url_safe, true);
            }
        }
        Echoes { forms }
    }

    /// Whether `bytes`, as they are or percent-decoded, carry any form of
    /// the secret, in any letter case.
    pub fn found_in(&self, bytes: &[u8]) -> bool {
        if self.any_form_in(bytes) {
            return true;
        }
        let mut decoded: Option<Zeroizing<Vec<u8>>> = None;
        for _ in 0..PERCENT_LAYERS {
            let current = decoded.as_deref().map_or(bytes, Vec::as_slice);
            if !current.iter().any(|&b| b == b'%' || b == b'+') {
                return false;
            }
            let next = percent_decode_form(current);
            if next.as_slice() == current {
                return false;
            }
            if self.any_form_in(&next) {
                return true;
            }
            decoded = Some(next);
        }
        false
    }

    fn any_form_in(&self, haystack: &[u8]) -> bool {
        self.forms
            .iter()
            .any(|form| contains_ignoring_case(haystack, form))
    }

    /// Redacts a response head: the reason phrase is the standard one for
    /// the status whatever the upstream said; a header whose name carries
    /// the secret is dropped; a value that carries it becomes
    /// `[redacted]`. Returns how many parts of the head carried it.
    pub fn redact_head(&self, resp: &mut ResponseHeader) -> pingora::Result<u64> {
        let reason_revealed = resp
            .get_reason_phrase()
            .is_some_and(|r| self.found_in(r.as_bytes()));
        resp.set_reason_phrase(None)?;
        let plan = self.plan(&resp.headers);
        for name in &plan.dropped {
            resp.remove_header(name);
        }
        for (name, values) in plan.rewritten {
            resp.remove_header(&name);
            for value in values {
                resp.append_header(name.clone(), value)?;
            }
        }
        Ok(plan.revealed + u64::from(reason_revealed))
    }

    /// The same for trailers. Returns how many carried the secret.
    pub fn redact_trailers(&self, trailers: &mut HeaderMap) -> u64 {
        let plan = self.plan(trailers);
        for name in &plan.dropped {
            trailers.remove(name);
        }
        for (name, values) in plan.rewritten {
            trailers.remove(&name);
            for value in values {
                trailers.append(name.clone(), value);
            }
        }
        plan.revealed
    }

    fn plan(&self, headers: &HeaderMap) -> Plan {
        let mut plan = Plan::default();
        for name in headers.keys() {
            if self.found_in(name.as_str().as_bytes()) {
                plan.revealed += headers.get_all(name).iter().count() as u64;
                plan.dropped.push(name.clone());
                continue;
            }
            let values = headers.get_all(name);
            if !values.iter().any(|v| self.found_in(v.as_bytes())) {
                continue;
            }
            let kept = values
                .iter()
                .map(|v| {
                    if self.found_in(v.as_bytes()) {
                        plan.revealed += 1;
                        HeaderValue::from_static(REDACTED)
                    } else {
                        v.clone()
                    }
                })
                .collect();
            plan.rewritten.push((name.clone(), kept));
        }
        plan
    }
}

#[derive(Default)]
struct Plan {
    dropped: Vec<HeaderName>,
    rewritten: Vec<(HeaderName, Vec<HeaderValue>)>,
    revealed: u64,
}

fn hex(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() * 2));
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    out
}

/// The base64 characters that depend on `secret` alone, for each of the
/// three alignments it can have inside a longer encoded string: whatever
/// precedes or follows it, these characters appear in the encoding.
fn base64_at_every_alignment(secret: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    (0..3usize)
        .map(|offset| {
            let mut input = Zeroizing::new(vec![0u8; offset + secret.len()]);
            input[offset..].copy_from_slice(secret);
            let mut encoded = Zeroizing::new(vec![0u8; input.len() * 4 / 3 + 4]);
            let written = STANDARD_NO_PAD
                .encode_slice(&*input, &mut encoded[..])
                .unwrap_or(0);
            // Character j holds bits 6j..6j+6; it is the secret's alone when
            // those bits lie inside the secret's bits 8*offset..8*(offset+len).
            let first = (8 * offset).div_ceil(6);
            let end = (8 * (offset + secret.len()) / 6).min(written);
            Zeroizing::new(encoded.get(first..end).unwrap_or_default().to_vec())
        })
        .collect()
}

/// One layer of form decoding: `%XX` to its byte (either hex case), `+` to
/// a space; anything else, malformed escapes included, stays as it is.
fn percent_decode_form(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some(hex_value(h[0])? << 4 | hex_value(h[1])?)),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, other) => {
                out.push(other);
                i += 1;
            }
        }
    }
    out
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

/// Whether `needle` occurs in `haystack`, ASCII letters matched without
/// regard to case. Header values are short, and building a searcher per
/// value cost more than scanning them; a precomputed searcher would keep an
/// unzeroised copy of the secret.
fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else {
        return false;
    };
    let Some(last_start) = haystack.len().checked_sub(needle.len()) else {
        return false;
    };
    memchr::memchr2_iter(
        first.to_ascii_lowercase(),
        first.to_ascii_uppercase(),
        &haystack[..=last_start],
    )
    .any(|at| haystack[at..at + needle.len()].eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

    #[test]
    fn finds_the_needle_anywhere_in_any_case_and_nothing_else() {
        assert!(contains_ignoring_case(b"Bearer s3cret", b"s3cret"));
        assert!(contains_ignoring_case(b"S3CRET; Path=/", b"s3cret"));
        assert!(contains_ignoring_case(b"ss3cret", b"s3cret"));
        assert!(!contains_ignoring_case(b"s3cre", b"s3cret"));
        assert!(!contains_ignoring_case(b"s3cres3cre", b"s3cret"));
        assert!(!contains_ignoring_case(b"", b"s3cret"));
        assert!(!contains_ignoring_case(b"anything", b""));
    }

    /// Every encoding a client could decode, of the secret and of a longer
    /// value that carries it, at every offset.
    #[test]
    fn every_encoding_of_the_secret_is_found() {
        let secret = "tok-9f8e7d+/?= x";
        let echoes = Echoes::of(&[secret.as_bytes()]);
        let mut shown: Vec<String> = vec![
            secret.to_string(),
            secret.to_uppercase(),
            secret.to_lowercase(),
            hex(secret.as_bytes()).iter().map(|&b| b as char).collect(),
            hex(secret.as_bytes())
                .iter()
                .map(|&b| (b as char).to_ascii_uppercase())
                .collect(),
        ];
        for prefix in ["", "a", "ab", "Bearer ", "user:"] {
            let carried = format!("{prefix}{secret}");
            for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                shown.push(engine.encode(&carried));
            }
        }
        let percent_upper: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
        shown.push(percent_upper.clone());
        shown.push(percent_upper.to_lowercase());
        shown.push(secret.replace('+', "%2B").replace(' ', "+"));
        shown.push(percent_upper.replace('%', "%25"));
        for text in shown {
            assert!(echoes.found_in(format!("x={text};").as_bytes()), "{text}");
        }
        for innocent in ["tok-9f8e7d", "Bearer abc", "dG9rLTlm", "%74%6f%6b"] {
            assert!(!echoes.found_in(innocent.as_bytes()), "{innocent}");
        }
    }

    #[test]
    fn a_head_is_redacted_in_its_reason_names_values_and_trailers() {
        let echoes = Echoes::of(&[b"pw-123456"]);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("PW-123456")).unwrap();
        resp.append_header("location", "https://x/cb?p=pw%2D123456")
            .unwrap();
        resp.append_header("x-pw-123456", "1").unwrap();
        resp.append_header("link", "<https://x/pW-123456>").unwrap();
        resp.append_header("link", "<https://x/ok>").unwrap();
        resp.append_header("content-type", "text/plain").unwrap();
        assert_eq!(echoes.redact_head(&mut resp).unwrap(), 4);
        assert_eq!(resp.get_reason_phrase(), Some("OK"));
        assert_eq!(resp.headers["location"], REDACTED);
        assert!(resp.headers.get("x-pw-123456").is_none());
        let links: Vec<_> = resp.headers.get_all("link").iter().collect();
        assert_eq!(links, [REDACTED, "<https://x/ok>"]);
        assert_eq!(resp.headers["content-type"], "text/plain");
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        assert!(!String::from_utf8_lossy(&wire)
            .to_lowercase()
            .contains("pw-123456"));

        let mut trailers = HeaderMap::new();
        trailers.append("x-echo", HeaderValue::from_static("cHctMTIzNDU2"));
        trailers.append("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(echoes.redact_trailers(&mut trailers), 1);
        assert_eq!(trailers["x-echo"], REDACTED);
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[test]
    fn debug_shows_no_form() {
        let dbg = format!("{:?}", Echoes::of(&[b"very-secret"]));
        assert!(!dbg.contains("very-secret"), "{dbg}");
    }
}
