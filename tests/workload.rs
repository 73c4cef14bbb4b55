//! A mixed load through one sealgate over kept-alive connections, with
//! every response checked: plain and TLS callers, HTTP/1.1 and HTTP/2, a
//! plain and a verified-TLS data source each with a sealed credential,
//! small and large bodies both ways, and requests sealgate refuses. CI also
//! runs it against the release binary (`SEALGATE_TEST_BIN`), the build
//! users ship, whose profile-guided optimisation, fat LTO and allocator the
//! debug build never exercises.
//!
//! `./dev.sh pgo-train` trains that build's profile on this test, so two
//! settings scale it: `SEALGATE_WORKLOAD_ROUNDS` (default 4) and
//! `SEALGATE_WORKLOAD_MIX`, `full` (the default) or `downloads`, which
//! keeps only the plain and TLS HTTP/1.1 downloads the benchmarks measure.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

const BEARER: &str = "workload-bearer-3f9c1d";
const API_KEY: &str = "workload-api-key-77b2e0";
const UPLOAD_LEN: usize = 16 * 1024;
const PLAIN_CONNECTIONS: usize = 8;
const TLS_CONNECTIONS: usize = 2;

#[derive(Clone, Copy, PartialEq)]
enum Mix {
    Full,
    Downloads,
}

#[derive(Clone, Copy)]
struct Load {
    rounds: usize,
    mix: Mix,
}

impl Load {
    fn from_env() -> Load {
        let rounds = match std::env::var("SEALGATE_WORKLOAD_ROUNDS") {
            Ok(n) => n
                .parse()
                .expect("SEALGATE_WORKLOAD_ROUNDS is a number of rounds"),
            Err(_) => 4,
        };
        let mix = match std::env::var("SEALGATE_WORKLOAD_MIX").as_deref() {
            Err(_) | Ok("full") => Mix::Full,
            Ok("downloads") => Mix::Downloads,
            Ok(other) => panic!("SEALGATE_WORKLOAD_MIX is full or downloads, not {other:?}"),
        };
        Load { rounds, mix }
    }
}

fn request(method: &str, path: &str, body: Bytes) -> Request<BoxBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(full(body))
        .expect("request")
}

/// One kept-alive HTTP/1.1 caller connection, counting what it sends.
struct H1Caller {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
    sent: usize,
}

impl H1Caller {
    async fn over<S>(stream: S) -> H1Caller
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        H1Caller {
            sender: h1_over(stream).await,
            sent: 0,
        }
    }

    async fn send(&mut self, req: Request<BoxBody>) -> Response<hyper::body::Incoming> {
        self.sent += 1;
        self.sender.send_request(req).await.expect("response")
    }

    /// Checks the status and reads the body to the end, as a kept-alive
    /// connection needs.
    async fn exchange(&mut self, req: Request<BoxBody>, status: StatusCode) -> Bytes {
        let target = req.uri().to_string();
        let resp = self.send(req).await;
        assert_eq!(resp.status(), status, "{target}");
        body_bytes(resp).await
    }

    async fn download(&mut self, path: &str, len: usize) {
        let get = request("GET", path, Bytes::new());
        let body = self.exchange(get, StatusCode::OK).await;
        assert_eq!(body.len(), len, "{path}");
    }
}

/// One plain HTTP/1.1 caller connection: small and large downloads and,
/// in the full mix, an upload, the TLS data source, and a request for no
/// data source.
async fn plain_caller(proxy: SocketAddr, load: Load) -> usize {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let mut h1 = H1Caller::over(stream).await;
    let upload = Bytes::from(vec![b'u'; UPLOAD_LEN]);
    for _ in 0..load.rounds {
        for _ in 0..8 {
            h1.download("/plain/1k", 1024).await;
        }
        h1.download("/plain/64k", 64 * 1024).await;
        if load.mix == Mix::Downloads {
            continue;
        }
        let post = request("POST", "/plain/upload", upload.clone());
        let answer = h1.exchange(post, StatusCode::OK).await;
        assert_eq!(answer, UPLOAD_LEN.to_string(), "the upload arrived whole");
        for _ in 0..2 {
            h1.download("/secure/1k", 1024).await;
        }
        let unknown = h1.send(request("GET", "/nowhere/x", Bytes::new())).await;
        assert_error(unknown, 404, "unknown_datasource").await;
    }
    h1.sent
}

/// One TLS HTTP/1.1 caller connection of small downloads.
async fn tls_caller(tls: SocketAddr, ca: &TestCa, load: Load) -> usize {
    let stream = tls_connect(tls, &[ca], None, &[b"http/1.1"])
        .await
        .expect("TLS to sealgate");
    let mut h1 = H1Caller::over(stream).await;
    for _ in 0..load.rounds * 4 {
        h1.download("/plain/1k", 1024).await;
    }
    h1.sent
}

/// One TLS HTTP/2 caller connection with four streams at a time.
async fn h2_caller(tls: SocketAddr, ca: &TestCa, load: Load) -> usize {
    let stream = tls_connect(tls, &[ca], None, &[b"h2"])
        .await
        .expect("TLS to sealgate");
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let url = format!("https://localhost:{}/plain/1k", tls.port());
    let mut answered = 0;
    for _ in 0..load.rounds {
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let mut h2 = h2.clone();
            let req = Request::get(&url).body(empty()).expect("request");
            streams.spawn(async move {
                let resp = h2.send_request(req).await.expect("h2 response");
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(body_bytes(resp).await.len(), 1024);
            });
        }
        while let Some(done) = streams.join_next().await {
            done.expect("h2 stream");
            answered += 1;
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_kept_alive_load_is_answered_injected_and_audited_request_by_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).expect("keys config");
    let bearer = seal(&config, "plain", "token", BEARER);
    let api_key = seal(&config, "secure", "value", API_KEY);

    let upstream_ca = TestCa::new("workload upstream CA");
    upstream_ca.write_pem(&dir.path().join("upstream-ca.pem"));
    let bearer_header = format!("Bearer {BEARER}");
    let plain = upstream(content(move |c| c == bearer_header, "authorization"), None).await;
    let secure = upstream(
        content(|c| c == API_KEY, "x-api-key"),
        Some(upstream_ca.server_config(&["localhost"])),
    )
    .await;

    let callers_ca = TestCa::new("workload server CA");
    let (cert, key) = callers_ca.issue(vec![dns("localhost")]);
    std::fs::write(dir.path().join("server.pem"), cert).expect("server cert");
    std::fs::write(dir.path().join("server-key.pem"), key).expect("server key");
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut sg = Sealgate::start_in(
        dir,
        &format!(
            "{keys}\n[proxy.tls]\nlisten = [\"{tls}\"]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\
             [datasources.plain]\nurl = \"http://{plain}\"\n\
             credential = {{ kind = \"bearer\", token = \"{bearer}\" }}\n\
             [datasources.secure]\nurl = \"https://localhost:{secure}\"\nca_file = \"upstream-ca.pem\"\n\
             credential = {{ kind = \"header\", name = \"X-API-Key\", value = \"{api_key}\" }}\n",
            keys = keys.toml("k1"),
            plain = plain.addr,
            secure = secure.addr.port(),
        ),
    );

    let callers_ca = Arc::new(callers_ca);
    let load = Load::from_env();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..PLAIN_CONNECTIONS {
        callers.spawn(plain_caller(sg.proxy, load));
    }
    for _ in 0..TLS_CONNECTIONS {
        let ca = callers_ca.clone();
        callers.spawn(async move { tls_caller(tls, &ca, load).await });
    }
    if load.mix == Mix::Full {
        let ca = callers_ca.clone();
        callers.spawn(async move { h2_caller(tls, &ca, load).await });
    }
    let mut answered = 0;
    while let Some(requests) = callers.join_next().await {
        answered += requests.expect("caller task");
    }

    let records = sg.audit(answered);
    assert_eq!(records.len(), answered, "one audit record per request");
    let upstream_refusals = records.iter().filter(|r| r["status"] == 401).count();
    assert_eq!(upstream_refusals, 0, "every request carried its credential");
    sg.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sg.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "drained and exited cleanly"
    );
    let audit = std::fs::read_to_string(sg.dir.path().join("audit.log")).unwrap_or_default();
    let output = format!("{}{}{audit}", sg.stderr(), sg.stdout());
    for secret in [BEARER, API_KEY] {
        assert!(
            !output.contains(secret),
            "a credential reached sealgate's output"
        );
    }
}
