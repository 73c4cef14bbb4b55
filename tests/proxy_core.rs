//! The proxy core over real sockets: routing, streaming, header hygiene,
//! and sealgate's own errors.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

fn datasource(name: &str, url: &str) -> String {
    format!("[datasources.{name}]\nurl = \"{url}\"\ntimeout_ms = 3000\nconnect_timeout_ms = 1000\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn get_is_routed_below_the_base_path_with_query_and_host() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource("pay", &format!("http://{}/v1/", up.addr)));

    let resp = get(sg.proxy, "/pay/charges/ch_1?limit=3&expand[]=a%20b").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-sealgate-request-id"));
    let seen = json(resp).await;
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["target"], "/v1/charges/ch_1?limit=3&expand[]=a%20b");
    assert_eq!(seen["headers"]["host"], up.addr.to_string());

    let records = sg.audit(1);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r["datasource"].as_str(), r["status"].as_u64()),
        (Some("pay"), Some(200))
    );
    assert_eq!(
        r["path"], "/pay/charges/ch_1",
        "the audit path never carries the query"
    );
    assert_eq!(r["upstream"], up.addr.to_string());
    assert_eq!(r["decision"], "allow");
    sg.assert_metrics(&[
        r#"sealgate_requests_total{caller="local",code="200",datasource="pay"} 1"#,
        r#"sealgate_request_duration_seconds_count{datasource="pay"} 1"#,
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_body_is_streamed_through() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource("pay", &format!("http://{}", up.addr)));

    // A chunked body sent in pieces with pauses: sealgate must forward it
    // without knowing its length up front.
    let chunks: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; 16 * 1024])).collect();
    let expected = {
        let mut h = Sha256::new();
        chunks.iter().for_each(|c| h.update(c));
        format!("{:x}", h.finalize())
    };
    let stream = futures_stream(chunks);
    let req = Request::post("/pay/upload")
        .header("host", "x")
        .body(stream)
        .unwrap();
    let seen = json(send(sg.proxy, req).await).await;
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_len"], 64 * 16 * 1024);
    assert_eq!(seen["body_sha256"], expected);
    assert_eq!(seen["headers"]["transfer-encoding"], "chunked");

    let r = &sg.audit(1)[0];
    assert_eq!(r["request_bytes"], 64 * 16 * 1024);
}

fn futures_stream(chunks: Vec<Bytes>) -> BoxBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for c in chunks {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tx.send(Ok(Frame::data(c))).await.is_err() {
                return;
            }
        }
    });
    BodyExt::boxed(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_64_mib_download_arrives_intact() {
    const SIZE: usize = 64 * 1024 * 1024;
    fn block(i: usize) -> Bytes {
        Bytes::from(
            (0..65536)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect::<Vec<u8>>(),
        )
    }
    let expected = {
        let mut h = Sha256::new();
        (0..SIZE / 65536).for_each(|i| h.update(block(i)));
        h.finalize()
    };
    let up = upstream(
        handler(|_req| async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                for i in 0..SIZE / 65536 {
                    if tx.send(Ok(Frame::data(block(i)))).await.is_err() {
                        return;
                    }
                }
            });
            let body = BodyExt::boxed(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ));
            Response::builder()
                .header("content-length", SIZE)
                .body(body)
                .unwrap()
        }),
        None,
    )
    .await;
    let sg = Sealgate::start(&datasource("big", &format!("http://{}", up.addr)));

    let resp = get(sg.proxy, "/big/file").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut hasher, mut len) = (Sha256::new(), 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            len += data.len();
            hasher.update(&data);
        }
    }
    assert_eq!(len, SIZE);
    assert_eq!(hasher.finalize(), expected);
    assert_eq!(sg.audit(1)[0]["response_bytes"], SIZE as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_datasource_and_bare_root_are_404() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource("pay", &format!("http://{}", up.addr)));

    assert_error(get(sg.proxy, "/nope/x").await, 404, "unknown_datasource").await;
    assert_error(get(sg.proxy, "/").await, 404, "unknown_datasource").await;
    let records = sg.audit(2);
    assert_eq!(records[0]["decision"], "deny");
    assert_eq!(records[0]["error"], "unknown_datasource");
    assert!(records[0]["datasource"].is_null());
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    sg.assert_metrics(&[r#"sealgate_requests_total{caller="local",code="404",datasource="-"} 2"#]);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_escapes_are_400_and_never_reach_the_upstream() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&datasource("pay", &format!("http://{}/v1", up.addr)));

    for path in [
        "/pay/../admin",
        "/pay/%2e%2e/admin",
        "/pay/x/%2E%2E/%2e%2e/admin",
        "/pay/a%2fb",
        "/pay/a%5Cb",
    ] {
        let v = assert_error(get(sg.proxy, path).await, 400, "bad_request").await;
        assert!(
            v["message"].as_str().unwrap().contains("base path"),
            "{path}: {v}"
        );
    }
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_refused_is_502_upstream_unreachable() {
    let closed = REFUSING_PORT;
    let sg = Sealgate::start(&datasource("down", &format!("http://127.0.0.1:{closed}")));
    assert_error(get(sg.proxy, "/down/x").await, 502, "upstream_unreachable").await;
    let r = &sg.audit(1)[0];
    assert_eq!(
        (r["status"].as_u64(), r["error"].as_str()),
        (Some(502), Some("upstream_unreachable"))
    );
    assert_eq!(
        r["decision"], "allow",
        "sealgate let it through; the upstream failed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_slower_than_timeout_ms_is_504() {
    let slow = raw_upstream(|mut s| async move {
        let _ = read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let sg = Sealgate::start(&format!(
        "[datasources.slow]\nurl = \"http://{slow}\"\ntimeout_ms = 300\n"
    ));
    let started = std::time::Instant::now();
    assert_error(get(sg.proxy, "/slow/x").await, 504, "upstream_timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "timed out after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_dying_mid_body_never_looks_complete() {
    // Content-Length framing: the caller must see a short body and an error.
    let sized = raw_upstream(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
            .await;
        let _ = s.write_all(&[b'a'; 5000]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    })
    .await;
    // Chunked framing: the caller must never get the terminating chunk.
    let chunked = raw_upstream(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1000\r\n")
            .await;
        let _ = s.write_all(&[b'b'; 4096]).await;
        let _ = s.write_all(b"\r\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    })
    .await;
    let sg = Sealgate::start(&format!(
        "{}{}",
        datasource("sized", &format!("http://{sized}")),
        datasource("chunked", &format!("http://{chunked}"))
    ));

    for path in ["/sized/x", "/chunked/x"] {
        let resp = get(sg.proxy, path).await;
        assert_eq!(
            resp.status(),
            200,
            "{path}: the head was already on its way"
        );
        let whole = resp.into_body().collect().await;
        assert!(
            whole.is_err(),
            "{path}: a truncated body was delivered as complete"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_passed_back_not_followed() {
    let up = upstream(
        handler(|_req| async move {
            Response::builder()
                .status(302)
                .header("location", "https://elsewhere.example/steal")
                .body(empty())
                .unwrap()
        }),
        None,
    )
    .await;
    let sg = Sealgate::start(&datasource("r", &format!("http://{}", up.addr)));
    let resp = get(sg.proxy, "/r/x").await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "https://elsewhere.example/steal"
    );
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_cookies_and_caller_credentials_are_stripped() {
    // Response side: raw bytes, so the upstream can send exactly what a
    // misbehaving server would.
    let raw = raw_upstream(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-private, keep-alive\r\n\
                  x-private: internal\r\nkeep-alive: timeout=5\r\nproxy-authenticate: Basic\r\n\
                  upgrade: h2c\r\nset-cookie: session=abc\r\nx-kept: yes\r\n\r\nok",
            )
            .await;
    })
    .await;
    let up = echo_upstream().await;
    let sg = Sealgate::start(&format!(
        "{}{}[datasources.cookies]\nurl = \"http://{raw}\"\npass_set_cookie = true\n",
        datasource("raw", &format!("http://{raw}")),
        datasource("echo", &format!("http://{}", up.addr)),
    ));

    let resp = get(sg.proxy, "/raw/x").await;
    assert_eq!(resp.status(), 200);
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
        "set-cookie",
    ] {
        assert!(
            !resp.headers().contains_key(gone),
            "{gone} crossed sealgate"
        );
    }
    assert_eq!(resp.headers()["x-kept"], "yes");
    assert_eq!(body_bytes(resp).await, "ok");

    let resp = get(sg.proxy, "/cookies/x").await;
    assert_eq!(
        resp.headers()["set-cookie"],
        "session=abc",
        "pass_set_cookie keeps it"
    );

    // Request side: hop-by-hop and the caller's own credentials.
    let req = Request::get("/echo/x")
        .header("host", "sealgate.local")
        .header("connection", "x-trace-hop")
        .header("x-trace-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Y2FsbGVyOnNlY3JldA==")
        .header("authorization", "Bearer caller-token")
        .header("cookie", "caller=1")
        .header("x-kept", "yes")
        .body(empty())
        .unwrap();
    let seen = json(send(sg.proxy, req).await).await;
    let headers = seen["headers"].as_object().unwrap();
    for gone in [
        "x-trace-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "authorization",
        "cookie",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the upstream: {seen}"
        );
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(
        headers["host"],
        up.addr.to_string(),
        "Host is the upstream's, not the caller's"
    );
}
