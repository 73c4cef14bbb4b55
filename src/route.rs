//! `/<datasource>/<rest>` → the data source and the path below its base.
//!
//! The rest is forwarded as the caller encoded it (re-encoding could change
//! what the upstream sees), so it is judged in its decoded form: any segment
//! that would decode to a dot segment, a slash, a backslash or a NUL could
//! climb out of the data source's base path on some upstream, and is refused.

use std::borrow::Cow;

use percent_encoding::percent_decode;

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

fn check_rest(rest: &str) -> Result<(), RouteError> {
    let rest = rest.as_bytes();
    if memchr::memchr(b'\\', rest).is_some() {
        return Err(RouteError::Escape("a backslash in the path"));
    }
    for segment in rest.split(|&b| b == b'/') {
        // Borrowed unless the segment holds an escape: the common path
        // allocates nothing.
        let decoded: Cow<'_, [u8]> = percent_decode(segment).into();
        if *decoded == *b"." || *decoded == *b".." {
            return Err(RouteError::Escape("a dot segment in the path"));
        }
        if decoded.contains(&b'/') || decoded.contains(&b'\\') {
            return Err(RouteError::Escape("an encoded slash in the path"));
        }
        if decoded.contains(&0) {
            return Err(RouteError::Escape("a NUL byte in the path"));
        }
    }
    Ok(())
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
        ] {
            assert!(split(path).is_ok(), "{path}");
        }
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
}
