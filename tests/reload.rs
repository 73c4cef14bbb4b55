//! SIGHUP reload: what changes, what does not, and how credentials that no
//! longer open are handled.

mod common;

use std::time::Duration;

use common::*;
use hyper::Response;

#[tokio::test(flavor = "multi_thread")]
async fn a_credential_that_no_longer_opens_is_refused_with_503_never_sent_bare() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).unwrap();
    let sealed = seal(&config, "pay", "token", "tok-reload-1");
    let (up, seen) = recording_upstream().await;
    let other = echo_upstream().await;
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "{}[datasources.pay]\nurl = \"http://{}\"\ncredential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n\
             [datasources.other]\nurl = \"http://{}\"\n",
            keys.toml("k1"),
            up.addr,
            other.addr
        ),
    );
    assert_eq!(get(sg.proxy, "/pay/x").await.status(), 200);

    // The operator replaces k1 with a different key under the same id.
    let k1 = keys.dir.join("k1.key");
    let good_key = std::fs::read(&k1).unwrap();
    std::fs::remove_file(&k1).unwrap();
    keys.add("k1");
    reload_and_wait(&sg, "ok", 1);

    let v = assert_error(get(sg.proxy, "/pay/x").await, 503, "credential_unavailable").await;
    assert!(
        v["message"].as_str().unwrap().contains("nothing was sent"),
        "{v}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "nothing reached the upstream without its credential"
    );
    assert_eq!(
        get(sg.proxy, "/other/x").await.status(),
        200,
        "other data sources keep serving"
    );
    sg.assert_metrics(&[r#"sealgate_credential_open_failures_total{datasource="pay"} 2"#]);
    let listing = http_get_blocking(sg.admin, "/v1/datasources").unwrap().1;
    assert!(listing.contains(r#""state": "unavailable""#), "{listing}");
    assert!(sg
        .stderr()
        .contains("datasources.pay.credential.token: sealed value does not open with key \"k1\""));
    let records = sg.audit(3);
    let refused = records
        .iter()
        .find(|r| r["status"] == 503)
        .expect("a 503 record");
    assert_eq!(refused["error"], "credential_unavailable");

    // The right key back: served again.
    std::fs::write(&k1, good_key).unwrap();
    reload_and_wait(&sg, "ok", 2);
    assert_eq!(get(sg.proxy, "/pay/x").await.status(), 200);
    assert_eq!(
        seen.lock().unwrap()[1]["headers"]["authorization"],
        "Bearer tok-reload-1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_config_changes_nothing() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&format!("[datasources.a]\nurl = \"http://{}\"\n", up.addr));
    let config = sg.dir.path().join("sealgate.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let broken = good.replace("[datasources.a]", "[datasources.a]\nbogus = 1")
        + "[datasources.b]\nurl = \"http://127.0.0.1:1\"\n";
    std::fs::write(&config, broken).unwrap();
    reload_and_wait(&sg, "error", 1);
    assert_eq!(get(sg.proxy, "/a/x").await.status(), 200);
    assert_error(get(sg.proxy, "/b/x").await, 404, "unknown_datasource").await;
    assert!(
        sg.stderr()
            .contains("reload refused, running configuration unchanged"),
        "{}",
        sg.stderr()
    );
    assert!(
        sg.stderr()
            .contains("sealgate.toml:11: datasources.a.bogus: unknown field `bogus`"),
        "{}",
        sg.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_change_applies_to_new_requests_while_one_in_flight_finishes_on_the_old() {
    let old = upstream(
        handler(|_req| async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            Response::new(full("old"))
        }),
        None,
    )
    .await;
    let new = upstream(
        handler(|_req| async move { Response::new(full("new")) }),
        None,
    )
    .await;
    let sg = Sealgate::start(&format!("[datasources.a]\nurl = \"http://{}\"\n", old.addr));
    let proxy = sg.proxy;
    let in_flight = tokio::spawn(async move { body_bytes(get(proxy, "/a/x").await).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    sg.edit_config(&old.addr.to_string(), &new.addr.to_string());
    reload_and_wait(&sg, "ok", 1);
    assert_eq!(body_bytes(get(sg.proxy, "/a/x").await).await, "new");
    assert_eq!(in_flight.await.unwrap(), "old");
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_events_are_audited_and_sighup_reopens_the_audit_file() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&format!("[datasources.a]\nurl = \"http://{}\"\n", up.addr));
    assert_eq!(get(sg.proxy, "/a/before").await.status(), 200);
    sg.audit(1);

    // logrotate: move the file away, then SIGHUP.
    let audit = sg.dir.path().join("audit.log");
    let rotated = sg.dir.path().join("audit.log.1");
    std::fs::rename(&audit, &rotated).unwrap();
    reload_and_wait(&sg, "ok", 1);
    assert_eq!(get(sg.proxy, "/a/after").await.status(), 200);

    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains(r#""path":"/a/before""#) && !old.contains("/a/after"),
        "{old}"
    );
    let records = sg.audit(1);
    assert_eq!(
        records.len(),
        1,
        "the new file has only what came after the rotation"
    );
    assert_eq!(records[0]["path"], "/a/after");

    let start: serde_json::Value = old
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|r: &serde_json::Value| r["event"] == "start")
        .expect("a start event");
    assert_eq!(start["result"], "ok");
    assert!(
        start["request_id"].is_null() && start["status"].is_null(),
        "every key present: {start}"
    );
    let events = sg.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "reload" && e["result"] == "ok"),
        "{events:?}"
    );

    // A broken reload is recorded with what was wrong and where.
    sg.edit_config("[datasources.a]", "[datasources.a]\nbogus = 1");
    reload_and_wait(&sg, "error", 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let events = sg.audit_events();
        if let Some(failed) = events
            .iter()
            .find(|e| e["event"] == "reload" && e["result"] == "failed")
        {
            assert!(
                failed["message"]
                    .as_str()
                    .unwrap()
                    .contains("datasources.a.bogus: unknown field"),
                "{failed}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed reload event: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
