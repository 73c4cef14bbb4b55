//! What a request must be before sealgate forwards it with a credential:
//! a method that does not make the upstream reflect the request back, a
//! bounded target, unambiguous framing, and none of the headers that make
//! upstream frameworks route or dispatch differently from what sealgate
//! judged.

use http::header::{self, HeaderName};
use http::Version;
use pingora::http::RequestHeader;

use crate::errors::{ErrorCode, Refusal};
use crate::http::route::MAX_TARGET;

/// Methods whose answer echoes the request, credential included.
const REFLECTING_METHODS: [&str; 2] = ["TRACE", "TRACK"];

/// Headers through which a caller could make an upstream serve another
/// path (IIS, Symfony, Zend) or another method (Rails, Express, Spring)
/// than the one sealgate routed and judged.
const OVERRIDES: [&str; 6] = [
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// A refusal, and whether the connection must close after it: once the
/// framing is in doubt, what follows on the connection cannot be trusted.
pub struct Unfit {
    pub refusal: Refusal,
    pub close: bool,
}

pub fn check(req: &RequestHeader) -> Result<(), Unfit> {
    let refuse = |code, message: &str, close| {
        Err(Unfit {
            refusal: Refusal::new(code, message),
            close,
        })
    };
    if REFLECTING_METHODS.contains(&req.method.as_str()) {
        return refuse(
            ErrorCode::MethodNotAllowed,
            "this method makes the upstream send the request back, credential included",
            false,
        );
    }
    let target = req.raw_path().len();
    if target > MAX_TARGET {
        return refuse(
            ErrorCode::TargetTooLong,
            "the request target is longer than 8 KiB",
            true,
        );
    }
    if req.version == Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
        return refuse(
            ErrorCode::BadRequest,
            "an HTTP/1.1 request needs a Host header",
            true,
        );
    }
    let mut lengths = req.headers.get_all(header::CONTENT_LENGTH).iter();
    let first = lengths.next();
    if lengths.next().is_some()
        || first.is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return refuse(
            ErrorCode::BadRequest,
            "Content-Length must be one decimal number",
            true,
        );
    }
    Ok(())
}

/// The caller's own credentials, which never reach a data source.
const CALLER_CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
];

/// Removes, in one pass, what the caller sent that must not go out: its
/// own credentials, and the routing and method overrides.
pub fn strip_for_upstream(req: &mut RequestHeader) {
    let present: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| CALLER_CREDENTIALS.contains(name) || OVERRIDES.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in present {
        req.remove_header(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    /// Requests captured from curl, wget and Python's urllib
    /// (tests/corpus/README.md): what real clients send must pass.
    #[test]
    fn real_clients_requests_pass_and_their_route_is_read() {
        for raw in [
            &include_bytes!("../../tests/corpus/http/curl-get.request")[..],
            include_bytes!("../../tests/corpus/http/curl-post.request"),
            include_bytes!("../../tests/corpus/http/wget-get.request"),
            include_bytes!("../../tests/corpus/http/urllib-get.request"),
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Request::new(&mut headers);
            parsed.parse(raw).expect("a captured request head");
            let headers: Vec<(&str, &str)> = parsed
                .headers
                .iter()
                .map(|h| (h.name, std::str::from_utf8(h.value).expect("a text value")))
                .collect();
            assert!(headers.len() >= 3, "{headers:?}");
            let (method, target) = (
                parsed.method.unwrap_or_default(),
                parsed.path.unwrap_or_default(),
            );
            let mut req = request(method, target, &headers);
            assert_eq!(code(&req), None, "{method} {target}");
            assert!(
                crate::http::route::split(req.uri.path()).is_ok(),
                "{target}"
            );
            strip_for_upstream(&mut req);
        }
    }

    fn code(req: &RequestHeader) -> Option<(u16, bool)> {
        check(req).err().map(|u| (u.refusal.code.status(), u.close))
    }

    #[test]
    fn refuses_what_would_echo_or_mislead() {
        let host = [("host", "x")];
        assert_eq!(code(&request("GET", "/a/b", &host)), None);
        assert_eq!(code(&request("TRACE", "/a/b", &host)), Some((405, false)));
        assert_eq!(code(&request("TRACK", "/a/b", &host)), Some((405, false)));
        let long = format!("/a/{}", "x".repeat(MAX_TARGET));
        assert_eq!(code(&request("GET", &long, &host)), Some((414, true)));
        assert_eq!(code(&request("GET", "/a/b", &[])), Some((400, true)));
        let twice = [
            ("host", "x"),
            ("content-length", "4"),
            ("content-length", "4"),
        ];
        assert_eq!(code(&request("POST", "/a/b", &twice)), Some((400, true)));
        let listed = [("host", "x"), ("content-length", "4, 4")];
        assert_eq!(code(&request("POST", "/a/b", &listed)), Some((400, true)));
        let one = [("host", "x"), ("content-length", "4")];
        assert_eq!(code(&request("POST", "/a/b", &one)), None);
    }

    #[test]
    fn strips_every_override_and_caller_credential() {
        let mut headers: Vec<(&str, &str)> = OVERRIDES.iter().map(|h| (*h, "/admin")).collect();
        headers.push(("X-Original-URL", "/admin"));
        headers.push(("x-kept", "1"));
        headers.push(("authorization", "Bearer mine"));
        headers.push(("Proxy-Authorization", "Bearer mine"));
        headers.push(("cookie", "s=1"));
        let mut req = request("GET", "/a/b", &headers);
        strip_for_upstream(&mut req);
        let left: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
