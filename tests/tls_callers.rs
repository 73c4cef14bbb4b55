//! TLS termination and mutual TLS: callers known by their client
//! certificate, with certificates made here by rcgen and a real rustls client.

mod common;

use std::time::Duration;

use common::*;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

struct Pki {
    server_ca: TestCa,
    callers_ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            server_ca: TestCa::new("server CA"),
            callers_ca: TestCa::new("callers CA"),
        }
    }

    /// Writes the server certificate, its key and the callers' CA into `dir`.
    fn write(&self, dir: &std::path::Path) {
        let (cert, key) = self.server_ca.issue(vec![dns("localhost")]);
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server-key.pem"), key).unwrap();
        std::fs::write(dir.join("callers-ca.pem"), self.callers_ca.cert.pem()).unwrap();
    }
}

fn get_req(path: &str) -> Request<BoxBody> {
    Request::get(path)
        .header("host", "localhost")
        .body(empty())
        .unwrap()
}

/// A request over a fresh TLS connection: its status, or why it failed.
async fn tls_status(
    addr: std::net::SocketAddr,
    pki: &Pki,
    client: Option<&(String, String)>,
    req: Request<BoxBody>,
) -> Result<StatusCode, String> {
    let stream = tls_connect(addr, &[&pki.server_ca], client, &[b"http/1.1"])
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map(|r| r.status())
        .map_err(|e| format!("request: {e}"))
}

/// sealgate with a TLS listener (no client CA) in front of an echo upstream.
async fn start_tls_in_front_of_echo() -> (Pki, std::net::SocketAddr, Sealgate) {
    start_tls_in_front_of_echo_with("", "").await
}

/// Like `start_tls_in_front_of_echo`, with more keys in `[proxy]` and
/// `[proxy.tls]`.
async fn start_tls_in_front_of_echo_with(
    proxy_keys: &str,
    tls_keys: &str,
) -> (Pki, std::net::SocketAddr, Sealgate) {
    let up = echo_upstream().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let tls = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sg = Sealgate::start_in_with_proxy_keys(
        dir,
        proxy_keys,
        &format!(
            "[proxy.tls]\nlisten = [\"{tls}\"]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\
             {tls_keys}\n[datasources.echo]\nurl = \"http://{}\"\n",
            up.addr
        ),
    );
    (pki, tls, sg)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_termination_serves_h1_and_h2() {
    let (pki, tls, sg) = start_tls_in_front_of_echo().await;

    let stream = tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
        .await
        .unwrap();
    let mut h1 = h1_over(stream).await;
    let resp = h1.send_request(get_req("/echo/one")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["target"], "/one");

    let stream = tls_connect(tls, &[&pki.server_ca], None, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/echo/two", tls.port()))
        .body(empty())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, hyper::Version::HTTP_2)
    );
    assert_eq!(json(resp).await["target"], "/two");
    assert_eq!(sg.audit(2).len(), 2);
    let expiry = format!("sealgate_tls_cert_expiry_timestamp_seconds{{listener=\"{tls}\"}}");
    let value = sample_value(&sg.metrics(), &expiry).unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        value > now,
        "certificate expiry published in the future: {value}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_identifies_callers_by_their_uri_san() {
    let (up, seen) = recording_upstream().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    write_loopback_policy(dir.path());
    let token_hash = sha256_hex("tok-crm");
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!(
            "[callers.billing]\ntls_identity = \"spiffe://prod/billing\"\ndatasources = [\"pay\"]\n\
             [callers.crm]\ntoken_sha256 = \"{token_hash}\"\ndatasources = [\"crm\"]\n"
        ),
    )
    .unwrap();
    let tls = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[proxy.tls]\nlisten = [\"{tls}\"]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"callers-ca.pem\"\n\
             [policy]\ndir = \"policies\"\n\
             [datasources.pay]\nurl = \"http://{0}/p\"\n[datasources.crm]\nurl = \"http://{0}/c\"\n",
            up.addr
        ),
    );
    let billing = pki.callers_ca.issue(vec![uri("spiffe://prod/billing")]);
    let stranger = pki.callers_ca.issue(vec![uri("spiffe://prod/stranger")]);
    let outsider = TestCa::new("another CA").issue(vec![uri("spiffe://prod/billing")]);
    let no_uri = pki.callers_ca.issue(vec![dns("billing.local")]);

    assert_eq!(
        tls_status(tls, &pki, Some(&billing), get_req("/pay/x")).await,
        Ok(StatusCode::OK)
    );
    assert_eq!(
        tls_status(tls, &pki, Some(&billing), get_req("/crm/x")).await,
        Ok(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        tls_status(tls, &pki, Some(&stranger), get_req("/pay/x")).await,
        Ok(StatusCode::UNAUTHORIZED)
    );
    let mismatched = Request::get("/crm/x")
        .header("host", "localhost")
        .header("proxy-authorization", "Bearer tok-crm")
        .body(empty())
        .unwrap();
    assert_eq!(
        tls_status(tls, &pki, Some(&billing), mismatched).await,
        Ok(StatusCode::UNAUTHORIZED)
    );
    for (what, client) in [
        ("another CA", Some(&outsider)),
        ("no certificate", None),
        ("no URI SAN", Some(&no_uri)),
    ] {
        let result = tls_status(tls, &pki, client, get_req("/pay/x")).await;
        assert!(
            result.is_err(),
            "{what}: the handshake must be refused, got {result:?}"
        );
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "only billing's granted request went out"
    );
    let records = sg.audit(4);
    assert!(records
        .iter()
        .any(|r| r["caller"] == "billing" && r["status"] == 200));
}

#[test]
fn bad_tls_files_and_an_open_listener_without_callers_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.write(dir.path());
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    let cfg = dir.path().join("sealgate.toml");
    std::fs::write(
        &cfg,
        "[proxy.tls]\nlisten = [\"0.0.0.0:6443\"]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            ":2: proxy.tls.listen: 0.0.0.0:6443 is not loopback, and no [callers] are configured"
        ),
        "{err}"
    );

    std::fs::write(&cfg, "[proxy.tls]\nlisten = [\"127.0.0.1:6443\"]\ncert = \"garbage.pem\"\nkey = \"server-key.pem\"\n").unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    assert!(
        err.contains(":3: proxy.tls.cert:") && err.contains("no certificate found"),
        "{err}"
    );

    std::fs::write(&cfg, "[proxy.tls]\nlisten = [\"127.0.0.1:6443\"]\ncert = \"server.pem\"\nkey = \"missing.pem\"\n").unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    assert!(
        err.contains("proxy.tls.cert: cannot read") && err.contains("missing.pem"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_old_ones() {
    let (pki, tls, sg) = start_tls_in_front_of_echo().await;
    let old_stream = tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
        .await
        .unwrap();
    let mut old = h1_over(old_stream).await;
    assert_eq!(
        old.send_request(get_req("/echo/a")).await.unwrap().status(),
        200
    );

    // A bad new certificate is refused and the old one stays.
    std::fs::write(sg.dir.path().join("server.pem"), "garbage").unwrap();
    reload_and_wait(&sg, "error", 1);
    assert!(tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
        .await
        .is_ok());

    let next_ca = TestCa::new("next server CA");
    let (cert, key) = next_ca.issue(vec![dns("localhost")]);
    std::fs::write(sg.dir.path().join("server.pem"), cert).unwrap();
    std::fs::write(sg.dir.path().join("server-key.pem"), key).unwrap();
    reload_and_wait(&sg, "ok", 1);

    assert!(
        tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
            .await
            .is_err(),
        "new connections get the new certificate"
    );
    let fresh = tls_connect(tls, &[&next_ca], None, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(
        h1_over(fresh)
            .await
            .send_request(get_req("/echo/b"))
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        old.send_request(get_req("/echo/c")).await.unwrap().status(),
        200,
        "the connection made before the reload is still up"
    );
}

/// A connection that stalls its TLS handshake is closed at
/// `handshake_timeout_s` and counted while other callers are served; a
/// connection whose handshake finished is no longer bound by that deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_tls_handshake_is_closed_at_its_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (pki, tls, sg) =
        start_tls_in_front_of_echo_with("header_timeout_s = 10", "handshake_timeout_s = 1").await;
    let finished = tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
        .await
        .unwrap();
    let mut finished = h1_over(finished).await;

    let mut stalled = tokio::net::TcpStream::connect(tls).await.unwrap();
    let started = std::time::Instant::now();
    // The start of a ClientHello record, then nothing more.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let served_meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tls_status(tls, &pki, None, get_req("/echo/meanwhile")).await
    };
    let closed = async {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut rest)).await
    };
    let (status, closed) = tokio::join!(served_meanwhile, closed);
    assert_eq!(status, Ok(StatusCode::OK), "other callers are served");
    assert!(closed.is_ok(), "the stalled handshake was never closed");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, deadline 1 s"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        finished
            .send_request(get_req("/echo/later"))
            .await
            .unwrap()
            .status(),
        200,
        "a finished handshake is not cut by the handshake deadline"
    );
    sg.assert_metrics(&[r#"sealgate_downstream_closed_total{reason="tls_handshake_timeout"} 1"#]);
}

/// sealgate's readiness check of its own listeners makes no connection, so
/// a clean start with a TLS listener logs no handshake error, nor any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_clean_start_with_a_tls_listener_logs_no_error() {
    let (pki, tls, sg) = start_tls_in_front_of_echo().await;
    let stream = tls_connect(tls, &[&pki.server_ca], None, &[b"http/1.1"])
        .await
        .unwrap();
    let resp = h1_over(stream)
        .await
        .send_request(get_req("/echo/x"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let stderr = sg.stderr();
    assert!(stderr.contains("sealgate is ready"), "{stderr}");
    assert!(
        !stderr
            .lines()
            .any(|l| l.contains("ERROR") || l.contains("WARN")),
        "{stderr}"
    );
}
