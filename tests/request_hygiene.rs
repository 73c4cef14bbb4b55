//! Requests sealgate refuses or cleans before a credential goes out:
//! methods that reflect the request, path spellings that frameworks turn
//! into `..`, routing overrides, oversized targets, ambiguous framing, and
//! pipelined requests answered in order.

mod common;

use std::sync::atomic::Ordering;

use common::*;

fn datasource(url: &str) -> String {
    format!("[datasources.pay]\nurl = \"{url}\"\ntimeout_ms = 3000\n")
}

/// The status line and JSON `error` of one raw exchange.
fn status_and_code(answer: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(answer);
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code)
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_that_reflect_the_request_are_405_without_reaching_the_upstream() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}", up.addr)));
    for method in ["TRACE", "TRACK"] {
        let request = format!("{method} /pay/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
        let (status, code) = status_and_code(&raw_exchange(sg.proxy, request.as_bytes()).await);
        assert!(status.starts_with("HTTP/1.1 405"), "{method}: {status}");
        assert_eq!(code, "method_not_allowed", "{method}");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);
    let records = sg.audit(2);
    assert!(
        records
            .iter()
            .all(|r| r["status"] == 405 && r["decision"] == "deny"),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spellings_frameworks_read_as_dot_dot_are_400() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}/v1", up.addr)));
    for path in [
        "/pay/..;/admin",
        "/pay/x/..;jsessionid=1/..;/admin",
        "/pay/%252e%252e/admin",
        "/pay/a%252fb",
        "/pay/%c0%ae%c0%ae/admin",
        "/pay/a%c0%afb",
        "/pay/%u002e%u002e/admin",
        "/pay/%ef%bc%8e%ef%bc%8e/admin",
        "/pay/.../admin",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
        let (status, code) = status_and_code(&raw_exchange(sg.proxy, request.as_bytes()).await);
        assert!(status.starts_with("HTTP/1.1 400"), "{path}: {status}");
        assert_eq!(code, "bad_request", "{path}");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_and_method_overrides_never_reach_the_upstream() {
    let (up, seen) = recording_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}", up.addr)));
    let request = "GET /pay/x HTTP/1.1\r\nHost: s\r\nX-Original-URL: /admin\r\n\
                   X-Rewrite-URL: /admin\r\nX-HTTP-Method-Override: TRACE\r\n\
                   X-Method-Override: DELETE\r\nX-Kept: 1\r\nConnection: close\r\n\r\n";
    let (status, _) = status_and_code(&raw_exchange(sg.proxy, request.as_bytes()).await);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let seen = seen.lock().unwrap();
    let headers = seen[0]["headers"].as_object().unwrap();
    assert_eq!(headers["x-kept"], "1");
    for stripped in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
    ] {
        assert!(!headers.contains_key(stripped), "{stripped}: {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_over_8_kib_is_414_and_its_audit_line_stays_bounded() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}", up.addr)));
    let path = format!("/pay/{}", "a".repeat(12 * 1024));
    let request = format!("GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
    let (status, code) = status_and_code(&raw_exchange(sg.proxy, request.as_bytes()).await);
    assert!(status.starts_with("HTTP/1.1 414"), "{status}");
    assert_eq!(code, "bad_request");
    let at_limit = format!("/pay/{}", "a".repeat(8 * 1024 - 6));
    let request = format!("GET {at_limit} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
    let (status, _) = status_and_code(&raw_exchange(sg.proxy, request.as_bytes()).await);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    let records = sg.audit(2);
    assert!(
        records[0]["path"].as_str().unwrap().len() <= 8 * 1024,
        "bounded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_host_and_repeated_content_length_are_400_and_close() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}", up.addr)));
    let no_host = raw_exchange(sg.proxy, b"GET /pay/x HTTP/1.1\r\n\r\n").await;
    let (status, code) = status_and_code(&no_host);
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert_eq!(code, "bad_request");
    // No `Connection: close` from the client: the close is sealgate's.
    for lengths in [
        "Content-Length: 4, 4\r\n",
        "Content-Length: 4\r\nContent-Length: 4\r\n",
    ] {
        let request = format!("POST /pay/x HTTP/1.1\r\nHost: s\r\n{lengths}\r\nabcd");
        let started = std::time::Instant::now();
        let answer = raw_exchange(sg.proxy, request.as_bytes()).await;
        assert!(
            started.elapsed().as_secs() < 4,
            "sealgate closed the connection"
        );
        let (status, code) = status_and_code(&answer);
        assert!(status.starts_with("HTTP/1.1 400"), "{lengths}: {status}");
        assert_eq!(code, "bad_request");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);
    // HTTP/1.0 has no Host requirement.
    let old = raw_exchange(sg.proxy, b"GET /pay/x HTTP/1.0\r\n\r\n").await;
    assert!(
        String::from_utf8_lossy(&old).starts_with("HTTP/1.1 200")
            || String::from_utf8_lossy(&old).starts_with("HTTP/1.0 200")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource(&format!("http://{}", up.addr)));
    let answer = raw_exchange(
        sg.proxy,
        b"GET /pay/first HTTP/1.1\r\nHost: s\r\n\r\n\
          GET /pay/second HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    let first = text.find("\"target\":\"/first\"");
    let second = text.find("\"target\":\"/second\"");
    assert!(
        first.is_some() && second.is_some() && first < second,
        "both answered, in order:\n{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert_eq!(sg.audit(2).len(), 2);
}
