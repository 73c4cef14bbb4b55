//! `/<datasource>/<rest>` → the data source and the path below its base.
//!
//! The rest is forwarded as the caller encoded it (re-encoding could change
//! what the upstream sees), so it is judged in every form an upstream
//! framework may turn it into: percent-decoded once and again (double
//! encoding), `%uXXXX` as IIS reads it, `;` path parameters stripped as
//! Tomcat, Jetty and Spring do, overlong UTF-8 and the Unicode look-alikes
//! that normalisation folds into `.`, `/` or `\`. Any segment that could
//! become a dot segment, a slash, a backslash or a control character in one
//! of those forms could climb out of the data source's base path on some
//! upstream, and is refused.

use std::borrow::Cow;

/// The longest request target sealgate passes on (414 beyond it); it also
/// bounds the path an audit record carries.
pub const MAX_TARGET: usize = 8 * 1024;

/// How many layers of percent-encoding are undone before a segment that
/// still decodes further is refused outright.
const DECODE_LAYERS: usize = 3;

/// Characters that Unicode normalisation (NFKC) folds into `.`, `..`, `/`
/// or `\`: one and two dot leaders, small and fullwidth full stops,
/// fullwidth solidus and reverse solidus, small reverse solidus.
const LOOKALIKES: [char; 7] = [
    '\u{2024}', '\u{2025}', '\u{FE52}', '\u{FF0E}', '\u{FF0F}', '\u{FF3C}', '\u{FE68}',
];

#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub datasource: &'a str,
    /// Empty, or starting with '/'.
    pub rest: &'a str,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum RouteError {
    /// The path names no data source at all (e.g. `/`).
    NoDatasource,
    /// The rest could escape the base path; the text says how.
    Escape(&'static str),
}

pub fn split(path: &str) -> Result<Route<'_>, RouteError> {
    let after_slash = path.strip_prefix('/').ok_or(RouteError::NoDatasource)?;
    let (datasource, rest) = match memchr::memchr(b'/', after_slash.as_bytes()) {
        Some(i) => after_slash.split_at(i),
        None => (after_slash, ""),
    };
    if datasource.is_empty() {
        return Err(RouteError::NoDatasource);
    }
    check_rest(rest)?;
    Ok(Route { datasource, rest })
}

/// `path` cut to at most `MAX_TARGET` bytes, on a character boundary.
pub fn bounded(path: &str) -> &str {
    if path.len() <= MAX_TARGET {
        return path;
    }
    let end = (0..=MAX_TARGET)
        .rev()
        .find(|&i| path.is_char_boundary(i))
        .unwrap_or(0);
    &path[..end]
}

fn check_rest(rest: &str) -> Result<(), RouteError> {
    let rest = rest.as_bytes();
    if memchr::memchr(b'\\', rest).is_some() {
        return Err(RouteError::Escape("a backslash in the path"));
    }
    rest.split(|&b| b == b'/').try_for_each(check_segment)
}

/// Judges a segment as sent and in each decoded form. Borrowed unless the
/// segment holds an escape: the common path allocates nothing.
fn check_segment(raw: &[u8]) -> Result<(), RouteError> {
    let mut layer: Cow<'_, [u8]> = Cow::Borrowed(raw);
    for _ in 0..=DECODE_LAYERS {
        judge(&layer)?;
        if memchr::memchr(b'%', &layer).is_none() {
            return Ok(());
        }
        let decoded = decode_layer(&layer);
        if decoded == *layer {
            return Ok(());
        }
        layer = Cow::Owned(decoded);
    }
    Err(RouteError::Escape(
        "percent-encoding nested more than three deep in the path",
    ))
}

fn judge(segment: &[u8]) -> Result<(), RouteError> {
    // A path parameter does not change which resource a segment names to
    // Tomcat, Jetty or Spring: `..;x` is `..` to them.
    let name = segment.split(|&b| b == b';').next().unwrap_or_default();
    if !name.is_empty() && name.iter().all(|&b| b == b'.' || b == b' ') {
        return Err(RouteError::Escape("a dot segment in the path"));
    }
    if segment.iter().any(|&b| b == b'/' || b == b'\\') {
        return Err(RouteError::Escape("an encoded slash in the path"));
    }
    if segment.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(RouteError::Escape("a control character in the path"));
    }
    if has_overlong_utf8(segment) {
        return Err(RouteError::Escape("an overlong UTF-8 sequence in the path"));
    }
    if segment.iter().any(|&b| b >= 0x80) {
        let text = String::from_utf8_lossy(segment);
        if text.contains(LOOKALIKES) {
            return Err(RouteError::Escape(
                "a character that normalises to a dot or slash in the path",
            ));
        }
    }
    Ok(())
}

/// Lenient decoders read these as ASCII (`%c0%ae` as `.`): lead bytes
/// C0 and C1 are always overlong, E0 and F0 are with a low second byte.
fn has_overlong_utf8(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|pair| {
        matches!(
            pair,
            [0xc0 | 0xc1, _] | [0xe0, 0x80..=0x9f] | [0xf0, 0x80..=0x8f]
        )
    }) || bytes.last().is_some_and(|&b| b == 0xc0 || b == 0xc1)
}

/// One layer of decoding: `%XX`, and `%uXXXX` as IIS reads it; anything
/// malformed stays as it is.
fn decode_layer(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = bytes.get(i + 1..i + 3).and_then(hex_byte) {
                out.push(b);
                i += 3;
                continue;
            }
            let wide = bytes
                .get(i + 1..i + 6)
                .filter(|u| u[0].eq_ignore_ascii_case(&b'u'))
                .and_then(|u| {
                    Some(u32::from(hex_byte(&u[1..3])?) << 8 | u32::from(hex_byte(&u[3..5])?))
                })
                .and_then(char::from_u32);
            if let Some(c) = wide {
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += 6;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |d: u8| (d as char).to_digit(16);
    Some((digit(*pair.first()?)? << 4 | digit(*pair.get(1)?)?) as u8)
}

/// The request target sent upstream: base path, the caller's rest, the
/// caller's query string unchanged.
pub fn upstream_target(base_path: &str, rest: &str, query: Option<&str>) -> String {
    let mut target =
        String::with_capacity(base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    target.push_str(base_path);
    target.push_str(rest);
    if target.is_empty() {
        target.push('/');
    }
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_datasource_and_rest() {
        assert_eq!(
            split("/pay/v1/x"),
            Ok(Route {
                datasource: "pay",
                rest: "/v1/x"
            })
        );
        assert_eq!(
            split("/pay"),
            Ok(Route {
                datasource: "pay",
                rest: ""
            })
        );
        assert_eq!(
            split("/pay/"),
            Ok(Route {
                datasource: "pay",
                rest: "/"
            })
        );
        assert_eq!(split("/"), Err(RouteError::NoDatasource));
        assert_eq!(split("//x"), Err(RouteError::NoDatasource));
        assert_eq!(split("*"), Err(RouteError::NoDatasource));
    }

    #[test]
    fn refuses_every_spelling_of_climbing_out() {
        for path in [
            "/pay/..",
            "/pay/../x",
            "/pay/a/../../x",
            "/pay/%2e%2e/x",
            "/pay/%2E%2e",
            "/pay/.%2e/x",
            "/pay/./x",
            "/pay/%2e",
            "/pay/a%2fb",
            "/pay/a%2F..%2Fb",
            "/pay/a%5cb",
            "/pay/a\\b",
            "/pay/a%00",
            // Path parameters on dot segments (Tomcat, Jetty, Spring).
            "/pay/..;/x",
            "/pay/..;jsessionid=1/x",
            "/pay/%2e%2e;x",
            "/pay/.;/x",
            // Double and triple percent-encoding.
            "/pay/%252e%252e/x",
            "/pay/a%252fb",
            "/pay/a%255cb",
            "/pay/%25252e%25252e/x",
            // IIS's %u form.
            "/pay/%u002e%u002e/x",
            "/pay/a%u002fb",
            // Overlong UTF-8 for '.', '/' and '\\'.
            "/pay/%c0%ae%c0%ae/x",
            "/pay/a%c0%afb",
            "/pay/a%c1%9cb",
            "/pay/%e0%80%ae%e0%80%ae",
            "/pay/%f0%80%80%ae",
            // Look-alikes NFKC folds into '.', '..', '/' and '\\'.
            "/pay/%ef%bc%8e%ef%bc%8e/x",
            "/pay/%e2%80%a5/x",
            "/pay/a%ef%bc%8fb",
            "/pay/a%ef%bc%bcb",
            // Windows drops trailing dots and spaces; URL parsers drop tabs.
            "/pay/.../x",
            "/pay/..%20/x",
            "/pay/.%09./x",
            "/pay/%2e%0a%2e/x",
            // Nested deeper than sealgate decodes.
            "/pay/%2525252e",
        ] {
            assert!(matches!(split(path), Err(RouteError::Escape(_))), "{path}");
        }
    }

    #[test]
    fn allows_dots_inside_names_and_encoded_other_bytes() {
        for path in [
            "/pay/a..b",
            "/pay/.well-known/x",
            "/pay/a%20b",
            "/pay/v1//x",
            "/pay/%2e%2ex",
            "/pay/a;b=c/x",
            "/pay/;../x",
            "/pay/%25",
            "/pay/100%25sure",
            "/pay/caf%c3%a9",
            "/pay/%u00e9t%u00e9",
            "/pay/%zz",
        ] {
            assert!(split(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn bounds_a_path_on_a_character_boundary() {
        assert_eq!(bounded("/a/b"), "/a/b");
        let long = format!("/{}", "é".repeat(MAX_TARGET));
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_TARGET && cut.len() >= MAX_TARGET - 1);
        assert!(long.starts_with(cut));
    }

    #[test]
    fn builds_the_upstream_target() {
        assert_eq!(
            upstream_target("/v1", "/x/y", Some("a=1&b")),
            "/v1/x/y?a=1&b"
        );
        assert_eq!(upstream_target("", "", None), "/");
        assert_eq!(upstream_target("/v1", "", None), "/v1");
        assert_eq!(upstream_target("", "", Some("q")), "/?q");
    }

    /// Paths built from the pieces that climb out of a base on some
    /// upstream, in every encoding: whatever `split` accepts must stay
    /// under the base when read by the most lenient decoder there is,
    /// written here independently of `check_segment`.
    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        const PIECES: &[&str] = &[
            "..",
            ".",
            "a",
            " ",
            "~",
            ";",
            ";x",
            "%",
            "%2",
            "%zz",
            "%00",
            "%2e",
            "%2E",
            "%252e",
            "%25252e",
            "%2525252e",
            "%u002e",
            "%U002E",
            "%c0%ae",
            "%c0%af",
            "%e0%80%ae",
            "%2f",
            "%5c",
            "\\",
            "\u{FF0E}",
            "\u{2025}",
            "\u{2024}",
            "%e2%80%a5",
            "%ef%bc%8e",
            "%ef%bc%8f",
        ];

        /// One layer of every decoding an upstream framework applies:
        /// `%XX`, IIS's `%uXXXX`, and overlong UTF-8 read as ASCII.
        fn lenient_layer(bytes: &[u8]) -> Vec<u8> {
            let hex = |s: &[u8]| {
                std::str::from_utf8(s)
                    .ok()
                    .and_then(|s| u32::from_str_radix(s, 16).ok())
            };
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                let rest = &bytes[i..];
                if rest.len() >= 6 && rest[0] == b'%' && rest[1].eq_ignore_ascii_case(&b'u') {
                    if let Some(c) = hex(&rest[2..6]).and_then(char::from_u32) {
                        out.extend_from_slice(c.to_string().as_bytes());
                        i += 6;
                        continue;
                    }
                }
                if rest.len() >= 3 && rest[0] == b'%' {
                    if let Some(b) = hex(&rest[1..3]) {
                        out.push(b as u8);
                        i += 3;
                        continue;
                    }
                }
                match rest {
                    [lead @ (0xc0 | 0xc1), next, ..] => {
                        out.push((lead & 1) << 6 | (next & 0x3f));
                        i += 2;
                    }
                    [0xe0, 0x80..=0x81, next, ..] => {
                        out.push(next & 0x7f);
                        i += 3;
                    }
                    _ => {
                        out.push(rest[0]);
                        i += 1;
                    }
                }
            }
            out
        }

        /// The rest as the most lenient upstream reads it: decoded until
        /// nothing changes, look-alikes folded, backslashes as slashes.
        fn leniently(rest: &str) -> String {
            let mut bytes = rest.as_bytes().to_vec();
            for _ in 0..8 {
                let next = lenient_layer(&bytes);
                if next == bytes {
                    break;
                }
                bytes = next;
            }
            String::from_utf8_lossy(&bytes)
                .replace(['\u{2024}', '\u{FE52}', '\u{FF0E}'], ".")
                .replace('\u{2025}', "..")
                .replace(['\u{FF0F}'], "/")
                .replace(['\u{FF3C}', '\u{FE68}', '\\'], "/")
        }

        /// Whether resolving the dot segments goes above where it began.
        fn climbs(path: &str) -> bool {
            let mut depth = 0i32;
            for segment in path.split('/') {
                let name: String = segment.split(';').next().unwrap_or("").replace(' ', "");
                if name.is_empty() || name == "." {
                    continue;
                }
                if name.bytes().all(|b| b == b'.') {
                    depth -= 1;
                    if depth < 0 {
                        return true;
                    }
                } else {
                    depth += 1;
                }
            }
            false
        }

        proptest! {
            #[test]
            fn an_accepted_path_never_climbs_above_the_base(
                segments in prop::collection::vec(
                    prop::collection::vec(prop::sample::select(PIECES), 0..4), 0..6),
            ) {
                let rest: String = segments.iter().map(|s| format!("/{}", s.concat())).collect();
                let path = format!("/ds{rest}");
                if let Ok(route) = split(&path) {
                    prop_assert_eq!(route.datasource, "ds");
                    prop_assert!(!climbs(&leniently(route.rest)), "{path} read as {}", leniently(route.rest));
                }
            }

            #[test]
            fn any_path_is_judged(path in any::<String>()) {
                if let Ok(route) = split(&path) {
                    prop_assert!(route.rest.is_empty() || route.rest.starts_with('/'));
                }
            }
        }
    }
}
