//! Every form in which an injected secret could come back from a data
//! source and still be read by the caller. An upstream that echoes what it
//! was sent (debug endpoints, error pages that quote headers) can hand the
//! credential back in any part of a response head, in a form a client
//! decodes: another letter case, hex, base64 (standard or URL-safe, padded
//! or not, at any alignment inside a longer encoded string),
//! percent-encoding (either hex case, `+` for space). The forms are made
//! once, when the credential is opened, and held in zeroizing memory.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use zeroize::Zeroizing;

use crate::scrub::Scrubber;

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
    /// The pair index of each form's first two bytes, beside `forms`, so a
    /// hit compares whole forms only where the pair is theirs.
    form_pairs: Zeroizing<Vec<usize>>,
    /// One bit for each case-folded byte pair that begins a form: a head is
    /// scanned once, and only where a form could begin is any compared.
    /// It holds two bytes of each form, never more.
    starts: Box<Zeroizing<[u64; PAIR_WORDS]>>,
    /// Forms of one byte (a one-character secret), which have no pair.
    single_bytes: Zeroizing<Vec<u8>>,
    /// For a secret that may also come back in a response body: the same
    /// forms, and their body encodings, as a streaming matcher. `None` for
    /// per-request values (a signature), and should the matcher not build,
    /// in which case a data source that scrubs refuses the request.
    body: Option<Arc<Scrubber>>,
}

/// Words of 64 bits in `Echoes::starts`: one bit per byte pair.
const PAIR_WORDS: usize = 65536 / 64;

/// Each byte, ASCII letters folded to lower case: one load per byte in
/// the scan instead of a compare and add.
const FOLD: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).to_ascii_lowercase();
        b += 1;
    }
    table
};

/// A byte pair, case-folded, as an index into `Echoes::starts`' bits.
fn pair_index(first: u8, second: u8) -> usize {
    usize::from(FOLD[usize::from(first)]) << 8 | usize::from(FOLD[usize::from(second)])
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
        let mut starts = Box::new(Zeroizing::new([0u64; PAIR_WORDS]));
        let mut single_bytes = Zeroizing::new(Vec::new());
        let mut form_pairs = Zeroizing::new(Vec::with_capacity(forms.len()));
        for form in &forms {
            match form.as_slice() {
                [only] => {
                    single_bytes.push(only.to_ascii_lowercase());
                    form_pairs.push(usize::MAX);
                }
                [first, second, ..] => {
                    let pair = pair_index(*first, *second);
                    starts[pair / 64] |= 1 << (pair % 64);
                    form_pairs.push(pair);
                }
                [] => form_pairs.push(usize::MAX),
            }
        }
        Echoes {
            forms,
            form_pairs,
            starts,
            single_bytes,
            body: None,
        }
    }

    /// `Echoes::of`, and a body scrubber of the same forms: for secrets
    /// that live longer than one request.
    pub fn with_body_scrubber(roots: &[&[u8]]) -> Echoes {
        let mut echoes = Echoes::of(roots);
        match Scrubber::of(echoes.forms.iter().map(|f| f.as_slice())) {
            Ok(scrubber) => echoes.body = Some(Arc::new(scrubber)),
            Err(why) => tracing::warn!(error = %why, "response bodies cannot be scrubbed"),
        }
        echoes
    }

    pub fn body_scrubber(&self) -> Option<&Arc<Scrubber>> {
        self.body.as_ref()
    }

    /// Whether `bytes`, as they are or percent-decoded, carry any form of
    /// the secret, in any letter case.
    pub fn found_in(&self, bytes: &[u8]) -> bool {
        self.found_decoding(bytes, PERCENT_LAYERS)
    }

    /// A `+` is a space to a form decoder and a `+` to a URL path's: where
    /// a layer holds one, both readings are followed (a fuzzed value,
    /// `%2561%2521+` for the secret `a!+`, hid from the form reading alone).
    fn found_decoding(&self, bytes: &[u8], layers: usize) -> bool {
        match self.scan(bytes) {
            Scan::Found => true,
            Scan::Clean => false,
            Scan::Escaped if layers == 0 => false,
            Scan::Escaped => {
                // Without a `%`, reading `+` as itself decodes nothing.
                let readings: &[bool] = if bytes.contains(&b'+') && bytes.contains(&b'%') {
                    &[true, false]
                } else {
                    &[true]
                };
                readings.iter().any(|&plus_is_space| {
                    let next = percent_decoded(bytes, plus_is_space);
                    next.as_slice() != bytes && self.found_decoding(&next, layers - 1)
                })
            }
        }
    }

    /// Runs on every response header name and value: one pass, a bit test
    /// per byte, forms compared only where their first two bytes stand;
    /// the same pass notes whether there is anything to percent-decode.
    fn scan(&self, haystack: &[u8]) -> Scan {
        if !self.single_bytes.is_empty()
            && haystack
                .iter()
                .any(|b| self.single_bytes.contains(&b.to_ascii_lowercase()))
        {
            return Scan::Found;
        }
        let starts: &[u64; PAIR_WORDS] = &self.starts;
        let Some((&first, rest)) = haystack.split_first() else {
            return Scan::Clean;
        };
        let escape = |b: u8| (b == b'%') | (b == b'+');
        let mut escaped = escape(first);
        let mut previous = usize::from(FOLD[usize::from(first)]);
        for (at, &byte) in rest.iter().enumerate() {
            let folded = usize::from(FOLD[usize::from(byte)]);
            let pair = previous << 8 | folded;
            if starts[pair / 64] >> (pair % 64) & 1 != 0 && self.form_at(&haystack[at..], pair) {
                return Scan::Found;
            }
            escaped |= escape(byte);
            previous = folded;
        }
        if escaped {
            Scan::Escaped
        } else {
            Scan::Clean
        }
    }

    fn form_at(&self, haystack: &[u8], pair: usize) -> bool {
        self.forms
            .iter()
            .zip(self.form_pairs.iter())
            .any(|(form, &form_pair)| form_pair == pair && starts_ignoring_case(haystack, form))
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

    /// One pass over every name and value; only the names that carried
    /// the secret are looked up again, so a clean head (nearly every one)
    /// costs no lookup and no allocation.
    fn plan(&self, headers: &HeaderMap) -> Plan {
        let mut carrying: Vec<&HeaderName> = Vec::new();
        for (name, value) in headers {
            let seen = carrying.last() == Some(&name);
            if !seen && (self.found_in(name.as_str().as_bytes()) || self.found_in(value.as_bytes()))
            {
                carrying.push(name);
            }
        }
        let mut plan = Plan::default();
        for name in carrying {
            let values = headers.get_all(name);
            if self.found_in(name.as_str().as_bytes()) {
                plan.revealed += values.iter().count() as u64;
                plan.dropped.push(name.clone());
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

/// What one pass over a header found.
#[derive(PartialEq, Eq)]
enum Scan {
    Found,
    /// Not as it stands, but it holds `%` or `+`: decode and look again.
    Escaped,
    Clean,
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

/// One layer of percent-decoding: `%XX` to its byte (either hex case), `+`
/// to a space where it is one; anything else, malformed escapes included,
/// stays as it is.
fn percent_decoded(bytes: &[u8], plus_is_space: bool) -> Zeroizing<Vec<u8>> {
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
            (None, b'+') if plus_is_space => {
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

/// Whether `haystack` begins with `form`, ASCII letters matched without
/// regard to case.
fn starts_ignoring_case(haystack: &[u8], form: &[u8]) -> bool {
    haystack
        .get(..form.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(form))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

    #[test]
    fn finds_a_form_anywhere_in_any_case_and_nothing_else() {
        let echoes = Echoes::of(&[b"s3cret"]);
        assert!(echoes.found_in(b"Bearer s3cret"));
        assert!(echoes.found_in(b"S3CRET; Path=/"));
        assert!(echoes.found_in(b"ss3cret"));
        assert!(!echoes.found_in(b"s3cre"));
        assert!(!echoes.found_in(b"s3cres3cre"));
        assert!(!echoes.found_in(b""));
        let one = Echoes::of(&[b"Q"]);
        assert!(one.found_in(b"a q b"));
        assert!(!one.found_in(b"abc"));
    }

    /// Found by the property below: a `+` left as it is in a
    /// percent-encoded path is a `+`, not the space a form decoder reads.
    #[test]
    fn a_plus_is_read_as_a_plus_and_as_a_space() {
        let echoes = Echoes::of(&[b"a0a!!+"]);
        assert!(echoes.found_in(b"%256%310%256%31!%252%31+"));
        assert!(echoes.found_in(b"a0a%21%21+"));
        let spaced = Echoes::of(&[b"a0a!! "]);
        assert!(spaced.found_in(b"a0a%21%21+"));
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

    /// A random secret, carried in a random encoding (as is, hex, base64
    /// of a longer value, percent-encoded one or two layers deep with a
    /// random choice of bytes escaped), in random letter case, inside
    /// random header text: always found.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn percent(bytes: &[u8], escape: &[bool]) -> Vec<u8> {
            let mut out = Vec::new();
            for (i, &b) in bytes.iter().enumerate() {
                if escape[i % escape.len()] || !b.is_ascii_graphic() || b == b'%' {
                    out.extend_from_slice(format!("%{b:02X}").as_bytes());
                } else {
                    out.push(b);
                }
            }
            out
        }

        /// Response heads captured from nginx (tests/corpus/README.md).
        const CAPTURED_HEADS: [&[u8]; 4] = [
            include_bytes!("../tests/corpus/http/nginx-200.response"),
            include_bytes!("../tests/corpus/http/nginx-302.response"),
            include_bytes!("../tests/corpus/http/nginx-401.response"),
            include_bytes!("../tests/corpus/http/nginx-404.response"),
        ];

        /// A captured response head as pingora holds it.
        fn captured_head(raw: &[u8]) -> ResponseHeader {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            parsed.parse(raw).expect("a captured response head");
            let mut resp =
                ResponseHeader::build(parsed.code.unwrap_or(500), None).expect("a status");
            for h in parsed.headers.iter() {
                resp.append_header(h.name.to_string(), h.value)
                    .expect("a captured header");
            }
            resp
        }

        proptest! {
            /// A secret echoed into any header of a real response head, in
            /// any encoding, is gone from the head sealgate passes on, and
            /// the body's framing (`Content-Length`) is left as it was.
            #[test]
            fn a_secret_echoed_into_a_captured_head_never_leaves_it(
                secret in "[!-~]{8,24}",
                head in 0..CAPTURED_HEADS.len(),
                at in any::<prop::sample::Index>(),
                encoding in 0..4u8,
            ) {
                let mut resp = captured_head(CAPTURED_HEADS[head]);
                let carried = match encoding {
                    0 => secret.clone(),
                    1 => STANDARD.encode(format!("user:{secret}")),
                    2 => percent(secret.as_bytes(), &[true]).into_iter().map(char::from).collect(),
                    _ => secret.bytes().map(|b| format!("{b:02x}")).collect(),
                };
                let names: Vec<HeaderName> = resp.headers.keys().cloned().collect();
                let framing = resp.headers.get("content-length").cloned();
                let target = names.get(at.index(names.len() + 1)).cloned();
                match &target {
                    Some(name) => {
                        let value = format!("{} {carried}", String::from_utf8_lossy(resp.headers[name].as_bytes()));
                        resp.insert_header(name.clone(), value).expect("a header value");
                    }
                    None => {
                        resp.append_header("x-echo", format!("you sent {carried}")).expect("a header value");
                    }
                }
                let echoes = Echoes::of(&[secret.as_bytes()]);
                prop_assert!(echoes.redact_head(&mut resp).expect("redacted") >= 1);
                let mut wire = Vec::new();
                resp.header_to_h1_wire(&mut wire);
                prop_assert!(!echoes.found_in(&wire), "{}", String::from_utf8_lossy(&wire));
                if target.as_ref().is_none_or(|n| n != "content-length") {
                    prop_assert_eq!(resp.headers.get("content-length"), framing.as_ref());
                }
            }

            #[test]
            fn a_carried_secret_is_found_in_any_encoding(
                secret in "[!-~]{6,24}",
                around in ("[ -~]{0,3}", "[ -~]{0,3}"),
                encoding in 0..5u8,
                escape in prop::collection::vec(any::<bool>(), 1..8),
                case in prop::collection::vec(any::<bool>(), 1..8),
                // No `%` in the text around: one before the value would
                // make an escape of its first characters.
                filler in ("[ -$&-~]{0,12}", "[ -$&-~]{0,12}"),
            ) {
                let value = format!("{}{secret}{}", around.0, around.1);
                let carried: Vec<u8> = match encoding {
                    0 => secret.clone().into_bytes(),
                    1 => secret.bytes().flat_map(|b| format!("{b:02x}").into_bytes()).collect(),
                    2 => STANDARD.encode(&value).into_bytes(),
                    3 => URL_SAFE_NO_PAD.encode(&value).into_bytes(),
                    _ => percent(&percent(secret.as_bytes(), &escape), &escape),
                };
                let mut text = filler.0.clone().into_bytes();
                text.extend(carried.iter().enumerate().map(|(i, b)| {
                    if case[i % case.len()] { b.to_ascii_uppercase() } else { b.to_ascii_lowercase() }
                }));
                text.extend_from_slice(filler.1.as_bytes());
                let echoes = Echoes::of(&[secret.as_bytes()]);
                prop_assert!(echoes.found_in(&text), "{secret:?} not found in {:?}", String::from_utf8_lossy(&text));
            }
        }
    }
}
