//! Response bodies with every form of the injected secret overwritten as
//! they stream (SPEC 12). A body arrives in pieces cut wherever the
//! upstream, TLS records or h2 frames cut it, so a form split across two
//! pieces is still found: the end of a piece that could begin a form is
//! held back until the next piece shows whether it does. Only such a tail
//! is held (a few bytes, never a whole piece), so a streamed response
//! (server-sent events, long polls) is not delayed. Each form is replaced
//! by `*` of its length, so `Content-Length` and chunk framing stay true.

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::{Bytes, BytesMut};
use zeroize::Zeroizing;

/// What an occurrence is overwritten with, byte for byte.
const MASK: u8 = b'*';

/// The forms of one secret a body is searched for, in any letter case.
pub struct Scrubber {
    /// The forms in lower case, matched against a lower-cased copy of the
    /// body: a case-sensitive matcher keeps its SIMD prefilter, which its
    /// case-insensitive mode loses (measured: 0.7 µs against 500 µs per
    /// 64 KiB of text), and folding a copy costs a few microseconds.
    /// Leftmost-longest for the same reason (overlapping search has no
    /// prefilter); `mask` searches again from one byte after each match's
    /// start, so a form that begins inside another is still found.
    matcher: AhoCorasick,
    forms: Vec<Zeroizing<Vec<u8>>>,
    /// Case-folded bytes that begin some form: a piece's tail is compared
    /// with the forms only from where one stands.
    begins_form: [bool; 256],
    longest: usize,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} forms)", self.forms.len())
    }
}

impl Scrubber {
    /// `forms` are the encodings a response head is redacted in
    /// (`Echoes`); a body also carries them percent-encoded (an echoed
    /// URL, a form post) or escaped in JSON, so those are added here.
    pub fn of<'a>(forms: impl Iterator<Item = &'a [u8]>) -> Result<Scrubber, String> {
        let mut all: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut add = |form: Zeroizing<Vec<u8>>| {
            if !form.is_empty() && !all.iter().any(|f| f.eq_ignore_ascii_case(&form)) {
                all.push(form);
            }
        };
        for form in forms {
            add(Zeroizing::new(form.to_ascii_lowercase()));
            add(percent_encoded(form, |_| true));
            add(percent_encoded(form, |b| !b.is_ascii_alphanumeric()));
            add(percent_encoded(form, |b| {
                !(b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            }));
            add(form_encoded(form));
            add(json_escaped(form));
        }
        for form in &mut all {
            form.make_ascii_lowercase();
        }
        // A form that contains another is found through it (`Bearer <t>`
        // through `<t>`, the base64 of `user:<p>` through the base64 of
        // `<p>` at its alignment): dropping it keeps the matcher within
        // what its SIMD prefilter takes (64 forms).
        let contained = |form: &[u8], all: &[Zeroizing<Vec<u8>>]| {
            all.iter().any(|other| {
                other.len() < form.len() && form.windows(other.len()).any(|w| w == &other[..])
            })
        };
        let snapshot = all.clone();
        all.retain(|form| !contained(form, &snapshot));
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(all.iter().map(|f| f.as_slice()))
            .map_err(|e| format!("the response scrubber could not be built: {e}"))?;
        let mut begins_form = [false; 256];
        for form in &all {
            if let Some(&first) = form.first() {
                begins_form[usize::from(first.to_ascii_lowercase())] = true;
                begins_form[usize::from(first.to_ascii_uppercase())] = true;
            }
        }
        let longest = all.iter().map(|f| f.len()).max().unwrap_or(0);
        Ok(Scrubber {
            matcher,
            forms: all,
            begins_form,
            longest,
        })
    }

    /// How many bytes at the end of `data` are the beginning of a form
    /// that did not finish inside it: those wait for the next piece.
    fn unfinished_tail(&self, data: &[u8]) -> usize {
        let from = data.len().saturating_sub(self.longest.saturating_sub(1));
        for start in from..data.len() {
            if !self.begins_form[usize::from(data[start])] {
                continue;
            }
            let tail = &data[start..];
            let begins = self.forms.iter().any(|form| {
                form.len() > tail.len() && form[..tail.len()].eq_ignore_ascii_case(tail)
            });
            if begins {
                return tail.len();
            }
        }
        0
    }

    /// Overwrites every form in `data` (whose lower-cased copy is
    /// `folded`); returns how many separate stretches were overwritten
    /// (overlapping forms count once). Every match is found before any is
    /// masked: a mask would hide a form that begins inside an earlier one.
    fn mask(&self, data: &mut BytesMut, folded: &[u8]) -> u64 {
        let mut found: Vec<(usize, usize)> = Vec::new();
        let mut from = 0;
        while from < folded.len() {
            let input = Input::new(folded).span(from..folded.len());
            let Some(m) = self.matcher.find(input) else {
                break;
            };
            found.push((m.start(), m.end()));
            from = m.start() + 1;
        }
        let (mut stretches, mut masked_to) = (0, 0);
        for (start, end) in found {
            if start >= masked_to {
                stretches += 1;
            }
            data[start..end].fill(MASK);
            masked_to = masked_to.max(end);
        }
        stretches
    }

    fn finds_any(&self, folded: &[u8]) -> bool {
        self.matcher.is_match(folded)
    }
}

/// One response body passing through a `Scrubber`.
pub struct BodyScrub {
    scrubber: std::sync::Arc<Scrubber>,
    /// The end of the last piece, which may begin a form. It may hold a
    /// prefix of the secret, so it is wiped when dropped.
    held: Zeroizing<Vec<u8>>,
    /// The lower-cased copy of the bytes being searched, kept between
    /// pieces so it is allocated once per body.
    folded: Zeroizing<Vec<u8>>,
}

impl BodyScrub {
    pub fn new(scrubber: std::sync::Arc<Scrubber>) -> BodyScrub {
        BodyScrub {
            scrubber,
            held: Zeroizing::new(Vec::new()),
            folded: Zeroizing::new(Vec::new()),
        }
    }

    /// Takes the next piece of the body (`None` when only the end is
    /// signalled) and gives back what may be sent now, with how many
    /// occurrences were overwritten. At `end` everything held is given
    /// back: nothing held could still become a form.
    pub fn pass(&mut self, piece: Option<Bytes>, end: bool) -> (Option<Bytes>, u64) {
        let piece = piece.unwrap_or_default();
        if self.held.is_empty() && !self.scrubber.finds_any(fold(&mut self.folded, &piece)) {
            let keep = if end {
                0
            } else {
                self.scrubber.unfinished_tail(&piece)
            };
            if keep == 0 {
                return (Some(piece).filter(|p| !p.is_empty()), 0);
            }
            let mut piece = piece;
            let tail = piece.split_off(piece.len() - keep);
            self.held.extend_from_slice(&tail);
            return (Some(piece), 0);
        }
        let mut data = BytesMut::with_capacity(self.held.len() + piece.len());
        data.extend_from_slice(&self.held);
        data.extend_from_slice(&piece);
        self.held.clear();
        fold(&mut self.folded, &data);
        let found = self.scrubber.mask(&mut data, &self.folded);
        let keep = if end {
            0
        } else {
            self.scrubber.unfinished_tail(&data)
        };
        let tail = data.split_off(data.len() - keep);
        self.held.extend_from_slice(&tail);
        (Some(data.freeze()).filter(|d| !d.is_empty()), found)
    }

    /// Whether bytes are held back, waiting for the next piece.
    pub fn holds_bytes(&self) -> bool {
        !self.held.is_empty()
    }
}

/// `data` in lower case, in `scratch`.
fn fold<'a>(scratch: &'a mut Vec<u8>, data: &[u8]) -> &'a [u8] {
    scratch.clear();
    scratch.extend_from_slice(data);
    scratch.make_ascii_lowercase();
    scratch
}

fn percent_encoded(form: &[u8], escaped: impl Fn(u8) -> bool) -> Zeroizing<Vec<u8>> {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Zeroizing::new(Vec::with_capacity(form.len() * 3));
    for &b in form {
        if escaped(b) {
            out.extend_from_slice(&[
                b'%',
                DIGITS[usize::from(b >> 4)],
                DIGITS[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
    out
}

/// `application/x-www-form-urlencoded`: a space is `+`.
fn form_encoded(form: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(form.len() * 3));
    for &b in form {
        if b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&percent_encoded(&[b], |b| {
                !(b.is_ascii_alphanumeric() || b"*-._".contains(&b))
            }));
        }
    }
    out
}

/// A JSON string's escapes, with `/` escaped as some encoders do.
fn json_escaped(form: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(form.len() * 2));
    for &b in form {
        if matches!(b, b'"' | b'\\' | b'/') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scrubber(secret: &str) -> Arc<Scrubber> {
        Arc::new(Scrubber::of([secret.as_bytes()].into_iter()).unwrap())
    }

    /// The body as the caller receives it, cut into pieces at `cuts`.
    fn through(scrubber: &Arc<Scrubber>, body: &[u8], cuts: &[usize]) -> (Vec<u8>, u64) {
        let mut stream = BodyScrub::new(scrubber.clone());
        let (mut out, mut found, mut from) = (Vec::new(), 0, 0);
        for &cut in cuts.iter().chain([body.len()].iter()) {
            let end = cut == body.len();
            let (sent, n) = stream.pass(Some(Bytes::copy_from_slice(&body[from..cut])), end);
            out.extend_from_slice(&sent.unwrap_or_default());
            found += n;
            from = cut;
        }
        (out, found)
    }

    #[test]
    fn a_form_is_masked_wherever_the_body_is_cut() {
        let secret = "tok/9f8e 7d+x";
        let s = scrubber(secret);
        let body =
            format!("a={secret}&b=tok%2F9f8e%207d%2Bx&c=TOK/9F8E 7D+X&j=\"tok\\/9f8e 7d+x\"");
        for cut in 0..body.len() {
            for second in cut..body.len() {
                let (out, found) = through(&s, body.as_bytes(), &[cut, second]);
                assert_eq!(out.len(), body.len());
                let text = String::from_utf8(out).unwrap();
                assert!(
                    !text.to_lowercase().contains("9f8e"),
                    "{cut},{second}: {text}"
                );
                assert_eq!(found, 4, "{cut},{second}: {text}");
            }
        }
    }

    #[test]
    fn a_clean_body_passes_unchanged_and_only_a_possible_start_is_held() {
        let s = scrubber("s3cret-value");
        let mut stream = BodyScrub::new(s.clone());
        let (out, n) = stream.pass(Some(Bytes::from_static(b"data: 1\n\n")), false);
        assert_eq!((out.as_deref(), n), (Some(&b"data: 1\n\n"[..]), 0));
        assert!(!stream.holds_bytes());
        let (out, _) = stream.pass(Some(Bytes::from_static(b"x s3cr")), false);
        assert_eq!(out.as_deref(), Some(&b"x "[..]));
        assert!(stream.holds_bytes());
        let (out, _) = stream.pass(Some(Bytes::from_static(b"ets s3cret-val")), false);
        assert_eq!(out.as_deref(), Some(&b"s3crets "[..]));
        let (out, n) = stream.pass(None, true);
        assert_eq!((out.as_deref(), n), (Some(&b"s3cret-val"[..]), 0));
        assert!(!stream.holds_bytes());
    }

    #[test]
    fn forms_that_overlap_are_all_masked_and_counted_once() {
        let s = Arc::new(Scrubber::of([&b"abc123"[..], &b"123xyz"[..]].into_iter()).unwrap());
        let (out, found) = through(&s, b"[abc123xyz] [Bearer ABC123]", &[5]);
        assert_eq!(out, b"[*********] [Bearer ******]");
        assert_eq!(found, 2);
    }

    /// More than 64 forms would cost the matcher its prefilter: ten times
    /// the CPU per body.
    #[test]
    fn the_forms_of_every_header_credential_fit_the_prefilter() {
        let token = "sk_live_51HxExa/mple+Tok~en_Value-0123456789";
        let bearer = format!("Bearer {token}");
        let pair = format!("svc-account:{token}");
        let basic = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &pair)
        );
        for roots in [
            vec![token, bearer.as_str()],
            vec![token, pair.as_str(), basic.as_str()],
        ] {
            let roots: Vec<&[u8]> = roots.iter().map(|r| r.as_bytes()).collect();
            let echoes = crate::echoes::Echoes::with_body_scrubber(&roots);
            let scrubber = echoes.body_scrubber().unwrap();
            assert!(scrubber.forms.len() <= 64, "{}", scrubber.forms.len());
        }
    }

    #[test]
    fn debug_shows_no_form() {
        let dbg = format!("{:?}", scrubber("very-secret"));
        assert!(!dbg.contains("very-secret"), "{dbg}");
    }
}
