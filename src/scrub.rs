//! Response bodies with every form of the injected secret overwritten as
//! they stream (SPEC 12). A body arrives in pieces cut wherever the
//! upstream, TLS records or h2 frames cut it, so a form split across two
//! pieces is still found: the end of a piece that could begin a form is
//! held back until the next piece shows whether it does. Only such a tail
//! is held (a few bytes, never a whole piece), so a streamed response
//! (server-sent events, long polls) is not delayed. Each form is replaced
//! by `*` of its length, so `Content-Length` and chunk framing stay true.

use aho_corasick::{packed, AhoCorasick, Input, MatchKind, Span};
use bytes::{Bytes, BytesMut};
use zeroize::Zeroizing;

/// What an occurrence is overwritten with, byte for byte.
const MASK: u8 = b'*';

/// How many bytes of each form, in every letter case, the SIMD search
/// looks for: three keep chance hits rare; two where three would need
/// more variants than it takes.
const WINDOW_LENS: [usize; 2] = [3, 2];

/// The most patterns aho-corasick's packed (SIMD) searcher takes.
const MAX_PACKED_PATTERNS: usize = 64;

/// The forms of one secret a body is searched for, in any letter case.
pub struct Scrubber {
    /// Finds where a form could begin (see `Matcher`).
    starts: Matcher,
    /// The forms in lower case, compared at each place `starts` finds.
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
        let mut add = |mut form: Zeroizing<Vec<u8>>| {
            form.make_ascii_lowercase();
            if !form.is_empty() && !all.contains(&form) {
                all.push(form);
            }
        };
        for form in forms {
            add(Zeroizing::new(form.to_vec()));
            add(percent_encoded(form, |_| true));
            add(percent_encoded(form, |b| !b.is_ascii_alphanumeric()));
            add(percent_encoded(form, |b| {
                !(b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            }));
            add(form_encoded(form));
            add(json_escaped(form));
        }
        // A form that contains another is found through it (`Bearer <t>`
        // through `<t>`, the base64 of `user:<p>` through the base64 of
        // `<p>` at its alignment).
        let contained = |form: &[u8], all: &[Zeroizing<Vec<u8>>]| {
            all.iter().any(|other| {
                other.len() < form.len() && form.windows(other.len()).any(|w| w == &other[..])
            })
        };
        let snapshot = all.clone();
        all.retain(|form| !contained(form, &snapshot));
        let starts = Matcher::new(&all)?;
        let mut begins_form = [false; 256];
        for form in &all {
            if let Some(&first) = form.first() {
                begins_form[usize::from(first.to_ascii_lowercase())] = true;
                begins_form[usize::from(first.to_ascii_uppercase())] = true;
            }
        }
        let longest = all.iter().map(|f| f.len()).max().unwrap_or(0);
        Ok(Scrubber {
            starts,
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

    /// Every place in `data` a form stands, in any letter case, as
    /// (start, end), in order, the longest form where several begin. A form
    /// that begins inside another is found too.
    fn find_all(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        let mut from = 0;
        while let Some((pattern, at)) = self.starts.find_from(data, from) {
            for &(form, offset) in &self.starts.owners[pattern] {
                let form = &self.forms[form];
                let Some(start) = at.checked_sub(offset) else {
                    continue;
                };
                let there = data.get(start..start + form.len());
                if there.is_some_and(|there| there.eq_ignore_ascii_case(form)) {
                    found.push((start, start + form.len()));
                }
            }
            from = at + 1;
        }
        // Windows stand at different offsets in their forms: hits come in
        // window order, not form order.
        found.sort_unstable_by_key(|&(start, end)| (start, std::cmp::Reverse(end)));
        found
    }
}

/// Overwrites the stretches `found`; returns how many separate stretches
/// there were (overlapping forms count once).
fn mask(data: &mut [u8], found: &[(usize, usize)]) -> u64 {
    let (mut stretches, mut masked_to) = (0, 0);
    for &(start, end) in found {
        if start >= masked_to {
            stretches += 1;
        }
        data[start..end].fill(MASK);
        masked_to = masked_to.max(end);
    }
    stretches
}

/// Finds where a form could stand: for each form, the window of a few
/// bytes with the fewest letters (digits and punctuation have one case),
/// in every letter case, searched case-sensitively in the body as it is,
/// so no lower-cased copy is made; each hit is compared with the whole
/// forms whose window it is. Measured per 64 KiB (`cargo bench --bench
/// request_path -- scrub`): an `AhoCorasick` of the whole forms in its
/// case-insensitive mode, 500 µs of text; case-sensitive over a lower-cased
/// copy, 10 µs of JSON but 300 µs of random bytes (its prefilter stops at
/// every rare byte); aho-corasick's packed SIMD searcher (Teddy) over that
/// copy, 11 µs on both; Teddy over the body, each form's first three
/// bytes, 5 µs of random bytes but 29 µs of JSON (letters in every case
/// make its fingerprints match text); with the fewest-letter windows, see
/// docs/BENCHMARKS.md.
struct Matcher {
    search: Search,
    /// For each pattern, the forms whose window it is, with the window's
    /// offset in the form.
    owners: Vec<Vec<(usize, usize)>>,
}

enum Search {
    Packed(packed::Searcher),
    /// Where the CPU has no SIMD for the packed searcher, or the windows
    /// need more variants than it takes.
    Automaton(AhoCorasick),
}

impl Matcher {
    fn new(forms: &[Zeroizing<Vec<u8>>]) -> Result<Matcher, String> {
        let mut windows = Windows::default();
        for len in WINDOW_LENS {
            windows = Windows::of(forms, len);
            if windows.patterns.len() <= MAX_PACKED_PATTERNS {
                break;
            }
        }
        let Windows { patterns, owners } = windows;
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(patterns.iter().map(|p| p.as_slice()))
            .build()
            .filter(|_| patterns.len() <= MAX_PACKED_PATTERNS);
        let search = match packed {
            Some(searcher) => Search::Packed(searcher),
            None => AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(patterns.iter().map(|p| p.as_slice()))
                .map(Search::Automaton)
                .map_err(|e| format!("the response scrubber could not be built: {e}"))?,
        };
        Ok(Matcher { search, owners })
    }

    /// The first window at or after `from`: its pattern and where it is.
    fn find_from(&self, haystack: &[u8], from: usize) -> Option<(usize, usize)> {
        let span = Span::from(from..haystack.len());
        let found = match &self.search {
            Search::Packed(searcher) => searcher
                .find_in(haystack, span)
                .map(|m| (m.pattern(), m.start())),
            Search::Automaton(automaton) => automaton
                .find(Input::new(haystack).span(span))
                .map(|m| (m.pattern(), m.start())),
        };
        found.map(|(pattern, at)| (pattern.as_usize(), at))
    }
}

/// The search patterns and whose windows they are.
#[derive(Default)]
struct Windows {
    patterns: Vec<Zeroizing<Vec<u8>>>,
    owners: Vec<Vec<(usize, usize)>>,
}

impl Windows {
    /// Each form's window of `len` bytes (the whole form if shorter) with
    /// the fewest letters, in every combination of letter case.
    fn of(forms: &[Zeroizing<Vec<u8>>], len: usize) -> Windows {
        let mut windows = Windows::default();
        for (index, form) in forms.iter().enumerate() {
            let len = form.len().min(len);
            let letters_in = |at: usize| {
                form[at..at + len]
                    .iter()
                    .filter(|b| b.is_ascii_alphabetic())
                    .count()
            };
            let offset = (0..=form.len() - len)
                .min_by_key(|&at| letters_in(at))
                .unwrap_or(0);
            let window = &form[offset..offset + len];
            let letters: Vec<usize> = (0..len)
                .filter(|&i| window[i].is_ascii_alphabetic())
                .collect();
            for cases in 0..1u32 << letters.len() {
                let mut variant = Zeroizing::new(window.to_vec());
                for (bit, &i) in letters.iter().enumerate() {
                    if cases >> bit & 1 == 1 {
                        variant[i] = variant[i].to_ascii_uppercase();
                    }
                }
                let pattern = match windows.patterns.iter().position(|p| *p == variant) {
                    Some(known) => known,
                    None => {
                        windows.patterns.push(variant);
                        windows.owners.push(Vec::new());
                        windows.patterns.len() - 1
                    }
                };
                windows.owners[pattern].push((index, offset));
            }
        }
        windows
    }
}

/// One response body passing through a `Scrubber`.
pub struct BodyScrub {
    scrubber: std::sync::Arc<Scrubber>,
    /// The end of the last piece, which may begin a form. It may hold a
    /// prefix of the secret, so it is wiped when dropped.
    held: Zeroizing<Vec<u8>>,
}

impl BodyScrub {
    pub fn new(scrubber: std::sync::Arc<Scrubber>) -> BodyScrub {
        BodyScrub {
            scrubber,
            held: Zeroizing::new(Vec::new()),
        }
    }

    /// Takes the next piece of the body (`None` when only the end is
    /// signalled) and gives back what may be sent now, with how many
    /// occurrences were overwritten. At `end` everything held is given
    /// back: nothing held could still become a form.
    pub fn pass(&mut self, piece: Option<Bytes>, end: bool) -> (Option<Bytes>, u64) {
        let piece = piece.unwrap_or_default();
        // A piece that needs no copy (nothing held, nothing found) goes on
        // as it came; otherwise it is copied once, and masked in the copy.
        let (mut data, found) = if self.held.is_empty() {
            let found = self.scrubber.find_all(&piece);
            if found.is_empty() {
                return (self.keep_tail(piece, end), 0);
            }
            (BytesMut::from(&piece[..]), found)
        } else {
            let mut joined = BytesMut::with_capacity(self.held.len() + piece.len());
            joined.extend_from_slice(&self.held);
            joined.extend_from_slice(&piece);
            self.held.clear();
            let found = self.scrubber.find_all(&joined);
            (joined, found)
        };
        let stretches = mask(&mut data, &found);
        (self.keep_tail(data.freeze(), end), stretches)
    }

    /// What of `data` may go now: all of it at the end, else all but a
    /// tail that could begin a form, which waits for the next piece.
    fn keep_tail(&mut self, mut data: Bytes, end: bool) -> Option<Bytes> {
        let keep = if end {
            0
        } else {
            self.scrubber.unfinished_tail(&data)
        };
        if keep > 0 {
            let tail = data.split_off(data.len() - keep);
            self.held.extend_from_slice(&tail);
        }
        Some(data).filter(|d| !d.is_empty())
    }

    /// Whether bytes are held back, waiting for the next piece.
    pub fn holds_bytes(&self) -> bool {
        !self.held.is_empty()
    }
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

    /// The SIMD search takes at most 64 patterns: more would cost many
    /// times the CPU per body.
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
            assert!(matches!(scrubber.starts.search, Search::Packed(_)));
        }
    }

    /// Forms whose windows need more than 64 case variants fall back to
    /// the automaton, which finds the same.
    #[test]
    fn many_forms_fall_back_to_the_automaton_and_find_the_same() {
        let words: Vec<String> = (0..40u8)
            .map(|i| format!("{}{}qzx", (b'a' + i % 26) as char, (b'a' + i / 26) as char))
            .collect();
        let s = Arc::new(Scrubber::of(words.iter().map(|w| w.as_bytes())).unwrap());
        assert!(matches!(s.starts.search, Search::Automaton(_)));
        let (out, found) = through(&s, b"[KAqZx] [bBQzX] [zzz]", &[4]);
        assert_eq!(out, b"[*****] [*****] [zzz]");
        assert_eq!(found, 2);
    }

    #[test]
    fn debug_shows_no_form() {
        let dbg = format!("{:?}", scrubber("very-secret"));
        assert!(!dbg.contains("very-secret"), "{dbg}");
    }

    /// Bodies of random bytes with forms of a random secret in random
    /// letter case at random places, cut at random points: every form is
    /// overwritten, and the body keeps its length.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A secret with its scrubber (built once per case), a body with
        /// its forms, and where the body is cut.
        fn body_with_forms() -> impl Strategy<Value = (String, Arc<Scrubber>, Vec<u8>, Vec<usize>)>
        {
            // No `*` in the secret: the mask itself could then be a form.
            "[!-)+-~]{4,24}"
                .prop_flat_map(|secret| {
                    let s = scrubber(&secret);
                    let part = prop_oneof![
                        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| (None, b)),
                        (0..s.forms.len(), any::<u32>())
                            .prop_map(|(f, case)| (Some(f), case.to_le_bytes().to_vec())),
                    ];
                    (
                        Just((secret, s)),
                        prop::collection::vec(part, 1..12),
                        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
                    )
                })
                .prop_map(|((secret, s), parts, cuts)| {
                    let mut body = Vec::new();
                    for (form, bytes) in parts {
                        match form {
                            Some(f) => {
                                let case =
                                    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                                body.extend(s.forms[f].iter().enumerate().map(|(i, b)| {
                                    if case >> (i % 32) & 1 == 1 {
                                        b.to_ascii_uppercase()
                                    } else {
                                        *b
                                    }
                                }));
                            }
                            None => body.extend(bytes),
                        }
                    }
                    let mut cuts: Vec<usize> =
                        cuts.iter().map(|c| c.index(body.len() + 1)).collect();
                    cuts.sort_unstable();
                    (secret, s, body, cuts)
                })
        }

        proptest! {
            #[test]
            fn no_form_survives_and_the_length_holds((secret, s, body, cuts) in body_with_forms()) {
                let (out, _) = through(&s, &body, &cuts);
                prop_assert_eq!(out.len(), body.len());
                let lower = out.to_ascii_lowercase();
                for form in &s.forms {
                    prop_assert!(
                        !lower.windows(form.len()).any(|w| w == &form[..]),
                        "a form of {secret:?} survived in {:?}", String::from_utf8_lossy(&out)
                    );
                }
            }
        }
    }
}
