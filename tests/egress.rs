//! Egress policy end to end: refusals that never reach the upstream,
//! allow_private, region source addresses and their failover, pool
//! isolation between regions, and policy reload.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An upstream on `bind` that answers with the source address of the
/// connection each request came on, and counts connections.
async fn peer_reporting_upstream(bind: Ipv4Addr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((bind, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(full(peer.ip().to_string())))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// Waits until `sent` requests are in the audit trail. The caller has its
/// response before pingora puts the upstream connection back in the pool;
/// the audit record is written after that, so once it is there the next
/// request finds the connection pooled instead of opening another.
fn back_in_the_pool(sg: &Sealgate, sent: usize) {
    assert_eq!(sg.audit(sent).len(), sent);
}

/// Starts sealgate with one policy file and the given data sources.
fn start_with_policy(policy: &str, datasources: &str) -> Sealgate {
    start_with_policy_and_proxy_keys("", policy, datasources)
}

/// The same, with more keys in the `[proxy]` table.
fn start_with_policy_and_proxy_keys(proxy_keys: &str, policy: &str, datasources: &str) -> Sealgate {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/egress.toml"), policy).unwrap();
    Sealgate::start_in_with_proxy_keys(
        dir,
        proxy_keys,
        &format!("[policy]\ndir = \"policies\"\n{datasources}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ssrf_targets_are_refused_before_any_connection() {
    let (up, accepted) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let port = up.port();
    let sg = start_with_policy(
        &format!(
            "[egress]\nallow = [\"127.0.0.0/8\", \"169.254.169.254\", \"[::ffff:127.0.0.1]\", \"localhost\", \"api.example.com\"]\n\
             allow_private = [\"127.0.0.1/32:{}\"]\n",
            port + 1
        ),
        &format!(
            "[datasources.metadata]\nurl = \"http://169.254.169.254/latest/meta-data/\"\n\
             [datasources.loopback]\nurl = \"http://127.0.0.1:{port}\"\n\
             [datasources.mapped]\nurl = \"http://[::ffff:127.0.0.1]:{port}\"\n\
             [datasources.decimal]\nurl = \"http://2130706433:{port}\"\n\
             [datasources.named]\nurl = \"http://localhost:{port}\"\n\
             [datasources.elsewhere]\nurl = \"http://not-allowed.example.net:{port}\"\n"
        ),
    );
    for (ds, label, words) in [
        (
            "metadata",
            "link_local",
            "169.254.169.254 is a link-local address",
        ),
        ("loopback", "loopback", "127.0.0.1 is a loopback address"),
        ("mapped", "loopback", "127.0.0.1 is a loopback address"),
        ("decimal", "loopback", "127.0.0.1 is a loopback address"),
        ("named", "loopback", "is a loopback address"),
        ("elsewhere", "no_allow_entry", "not-allowed.example.net:"),
    ] {
        let v = assert_error(
            get(sg.proxy, &format!("/{ds}/x")).await,
            403,
            "egress_denied",
        )
        .await;
        assert!(v["message"].as_str().unwrap().contains(words), "{ds}: {v}");
        let metric =
            format!("sealgate_egress_denied_total{{datasource=\"{ds}\",reason=\"{label}\"}} 1");
        sg.assert_metrics(&[&metric]);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection reached the upstream"
    );
    let records = sg.audit(6);
    assert!(records
        .iter()
        .all(|r| r["decision"] == "deny" && r["error"] == "egress_denied"));
    assert!(
        records
            .iter()
            .any(|r| r["reason"].as_str().unwrap_or("").contains("link-local")),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_private_admits_a_local_service_and_the_rule_is_recorded() {
    let (up, _) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let sg = start_with_policy(
        &format!(
            "[egress]\nallow = [\"127.0.0.1:{0}\"]\nallow_private = [\"127.0.0.1/32:{0}\"]\n",
            up.port()
        ),
        &format!(
            "[datasources.local]\nurl = \"http://127.0.0.1:{}\"\n",
            up.port()
        ),
    );
    assert_eq!(get(sg.proxy, "/local/x").await.status(), 200);
    let r = &sg.audit(1)[0];
    assert_eq!(r["decision"], "allow");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("allowed by ")
            && reason.ends_with(&format!("egress.toml:2 `127.0.0.1:{}`", up.port())),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regions_bind_their_egress_addresses_and_spread_connections() {
    let (up, accepted) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let sg = start_with_policy(
        "[egress]\nallow = [\"127.0.0.0/8\"]\nallow_private = [\"127.0.0.0/8\"]\n",
        &format!(
            "[regions.us]\negress_ips = [\"127.0.0.2\", \"127.0.0.3\"]\n\
             [datasources.pay]\nurl = \"http://{up}\"\nregion = \"us\"\n"
        ),
    );
    let mut seen = Vec::new();
    for sent in 1..=4 {
        seen.push(
            String::from_utf8(body_bytes(get(sg.proxy, "/pay/x").await).await.to_vec()).unwrap(),
        );
        back_in_the_pool(&sg, sent);
    }
    assert_eq!(seen, ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one pooled connection per egress address"
    );
    let records = sg.audit(4);
    for ip in ["127.0.0.2", "127.0.0.3"] {
        assert_eq!(
            records.iter().filter(|r| r["egress_ip"] == ip).count(),
            2,
            "{ip}"
        );
    }
    assert!(records.iter().all(|r| r["region"] == "us"));
}

/// With one thread sealgate runs one single-threaded event loop (not
/// tokio's work-stealing scheduler); its pooled upstream connections are
/// reused all the same.
#[tokio::test(flavor = "multi_thread")]
async fn one_thread_serves_from_one_event_loop_and_reuses_its_connections() {
    let (up, accepted) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let sg = start_with_policy_and_proxy_keys(
        "threads = 1",
        "[egress]\nallow = [\"127.0.0.0/8\"]\nallow_private = [\"127.0.0.0/8\"]\n",
        &format!("[datasources.pay]\nurl = \"http://{up}\"\n"),
    );
    for sent in 1..=6 {
        let resp = get(sg.proxy, "/pay/x").await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        back_in_the_pool(&sg, sent);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    assert!(!sg.stderr().contains("ERROR"), "{}", sg.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_egress_address_that_cannot_be_bound_falls_over_to_the_next() {
    let (up, _) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    // 192.0.2.55 (documentation range) is on no interface: binding it fails
    // locally, before any packet is sent.
    let sg = start_with_policy(
        "[egress]\nallow = [\"127.0.0.0/8\"]\nallow_private = [\"127.0.0.0/8\"]\n",
        &format!(
            "[regions.eu]\negress_ips = [\"192.0.2.55\", \"127.0.0.3\"]\n\
             [datasources.pay]\nurl = \"http://{up}\"\nregion = \"eu\"\n"
        ),
    );
    let resp = get(sg.proxy, "/pay/x").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_bytes(resp).await, "127.0.0.3");
    sg.assert_metrics(&[r#"sealgate_upstream_errors_total{datasource="pay",kind="bind"} 1"#]);
    assert_eq!(sg.audit(1)[0]["egress_ip"], "127.0.0.3");
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_are_never_shared_between_regions() {
    let (up, accepted) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let sg = start_with_policy(
        "[egress]\nallow = [\"127.0.0.0/8\"]\nallow_private = [\"127.0.0.0/8\"]\n",
        &format!(
            "[regions.a]\negress_ips = [\"127.0.0.2\"]\n[regions.b]\negress_ips = [\"127.0.0.3\"]\n\
             [datasources.in-a]\nurl = \"http://{up}\"\nregion = \"a\"\n\
             [datasources.in-b]\nurl = \"http://{up}\"\nregion = \"b\"\n"
        ),
    );
    for round in 1..=3 {
        assert_eq!(
            body_bytes(get(sg.proxy, "/in-a/x").await).await,
            "127.0.0.2"
        );
        assert_eq!(
            body_bytes(get(sg.proxy, "/in-b/x").await).await,
            "127.0.0.3"
        );
        back_in_the_pool(&sg, 2 * round);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn policy_errors_and_credentials_over_plain_http_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/a.toml"),
        "[egress]\nallow = [\"ok.example.com\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies/b.toml"),
        "# second file\n[egress]\nallow = [\"10.0.0.1/8\", \"*.ok\"]\nallow_private = [\"host:99999\"]\n",
    )
    .unwrap();
    let cfg = dir.path().join("sealgate.toml");
    std::fs::write(&cfg, "[policy]\ndir = \"policies\"\n").unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    let b = dir.path().join("policies/b.toml");
    assert!(
        err.contains(&format!(
            "{}:3: egress.allow: `10.0.0.1/8` has host bits set",
            b.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:4: egress.allow_private: `99999` is not a port",
            b.display()
        )),
        "{err}"
    );

    std::fs::write(
        dir.path().join("policies/b.toml"),
        "[egress]\nallow = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let keys = Keys::new(dir.path());
    std::fs::write(&cfg, keys.toml("k1")).unwrap();
    let sealed = seal(&cfg, "plain", "token", "tok-plain");
    std::fs::write(
        &cfg,
        format!(
            "{}[policy]\ndir = \"policies\"\n[datasources.plain]\nurl = \"http://127.0.0.1:8080\"\n\
             credential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n",
            keys.toml("k1")
        ),
    )
    .unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    assert!(
        err.contains("datasources.plain.url: a credential is only sent over https://"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("policies/b.toml"),
        "[egress]\nallow = [\"127.0.0.1\"]\nallow_private = [\"127.0.0.1/32:8080\"]\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 0, "admitted by allow_private: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_policies_and_a_broken_policy_keeps_the_old_one() {
    let (up, _) = peer_reporting_upstream(Ipv4Addr::LOCALHOST).await;
    let sg = start_with_policy(
        "[egress]\nallow = [\"127.0.0.0/8\"]\nallow_private = [\"127.0.0.0/8\"]\n",
        &format!("[datasources.pay]\nurl = \"http://{up}\"\n"),
    );
    assert_eq!(get(sg.proxy, "/pay/x").await.status(), 200);
    let policy = sg.dir.path().join("policies/egress.toml");

    std::fs::write(&policy, "[egress]\nallow = [\"127.0.0.0/8\"\n").unwrap();
    reload_and_wait(&sg, "error", 1);
    assert_eq!(
        get(sg.proxy, "/pay/x").await.status(),
        200,
        "the old policy stays in force"
    );
    assert!(
        sg.stderr().contains(&format!(
            "reload refused, running configuration unchanged: {}:",
            policy.display()
        )),
        "{}",
        sg.stderr()
    );

    std::fs::write(&policy, "[egress]\nallow = [\"api.example.com\"]\n").unwrap();
    reload_and_wait(&sg, "ok", 1);
    assert_error(get(sg.proxy, "/pay/x").await, 403, "egress_denied").await;
}
