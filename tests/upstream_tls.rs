//! Verified TLS to data sources, with certificates made here by rcgen.

mod common;

use common::*;
use hyper::{Request, Response};

/// An HTTPS upstream (h1 and h2 by ALPN) that reports the protocol it spoke.
async fn tls_upstream(ca: &TestCa, names: &[&str]) -> Upstream {
    upstream(
        handler(|req: Request<hyper::body::Incoming>| async move {
            Response::new(full(format!("{:?}", req.version())))
        }),
        Some(ca.server_config(names)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_upstream_verified_with_ca_file_speaks_h2() {
    let ca = TestCa::new("sealgate test CA");
    let up = tls_upstream(&ca, &["localhost"]).await;
    let sg = start_trusting(
        &ca,
        &format!(
            "[datasources.secure]\nurl = \"https://localhost:{}/api\"\nca_file = \"ca.pem\"\n",
            up.addr.port()
        ),
    );
    let resp = get(sg.proxy, "/secure/x").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        body_bytes(resp).await,
        "HTTP/2.0",
        "h2 negotiated by ALPN with the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ip_url_is_verified_against_the_ip_san() {
    let ca = TestCa::new("sealgate test CA");
    let up = tls_upstream(&ca, &["127.0.0.1"]).await;
    let sg = start_trusting(
        &ca,
        &format!(
            "[datasources.ip]\nurl = \"https://{}\"\nca_file = \"ca.pem\"\n",
            up.addr
        ),
    );
    assert_eq!(get(sg.proxy, "/ip/x").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_without_ca_file_is_502_upstream_tls() {
    let ca = TestCa::new("unknown CA");
    let up = tls_upstream(&ca, &["localhost"]).await;
    let sg = Sealgate::start(&format!(
        "[datasources.untrusted]\nurl = \"https://localhost:{}\"\n",
        up.addr.port()
    ));
    assert_error(get(sg.proxy, "/untrusted/x").await, 502, "upstream_tls").await;
    assert_eq!(sg.audit(1)[0]["error"], "upstream_tls");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_host_name_is_502_upstream_tls() {
    let ca = TestCa::new("sealgate test CA");
    let up = tls_upstream(&ca, &["other.example"]).await;
    let sg = start_trusting(
        &ca,
        &format!(
            "[datasources.wrong]\nurl = \"https://localhost:{}\"\nca_file = \"ca.pem\"\n",
            up.addr.port()
        ),
    );
    assert_error(get(sg.proxy, "/wrong/x").await, 502, "upstream_tls").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_are_not_shared_between_data_sources_with_different_cas() {
    // Same address, two data sources: one trusts the upstream's CA, one does
    // not. A connection verified for the first must never serve the second.
    let ca = TestCa::new("sealgate test CA");
    let up = tls_upstream(&ca, &["localhost"]).await;
    let other = TestCa::new("another CA");
    let dir = tempfile::tempdir().unwrap();
    ca.write_pem(&dir.path().join("ca.pem"));
    other.write_pem(&dir.path().join("other.pem"));
    let url = format!("https://localhost:{}", up.addr.port());
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[datasources.trusted]\nurl = \"{url}\"\nca_file = \"ca.pem\"\n\
             [datasources.distrusted]\nurl = \"{url}\"\nca_file = \"other.pem\"\n"
        ),
    );
    assert_eq!(get(sg.proxy, "/trusted/x").await.status(), 200);
    assert_error(get(sg.proxy, "/distrusted/x").await, 502, "upstream_tls").await;
}

/// sealgate with `ca`'s certificate written beside its config as `ca.pem`.
fn start_trusting(ca: &TestCa, datasources: &str) -> Sealgate {
    let dir = tempfile::tempdir().unwrap();
    ca.write_pem(&dir.path().join("ca.pem"));
    Sealgate::start_in(dir, datasources)
}
