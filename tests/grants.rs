//! Grants that expire by themselves (SPEC 12): after a grant's
//! `not_after` the caller is refused with no reload; `check` warns about
//! grants already past; the gauge shows each grant's end.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use hyper::Request;

fn with_token(path: &str, token: &str) -> Request<BoxBody> {
    Request::get(path)
        .header("host", "x")
        .header("proxy-authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap()
}

fn policy_dir(grants: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_loopback_policy(dir.path());
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [{grants}]\n",
            sha256_hex("tok-billing-1")
        ),
    )
    .unwrap();
    dir
}

async fn sleep_until_after(at: u64) {
    let end = UNIX_EPOCH + Duration::from_secs(at) + Duration::from_millis(50);
    if let Ok(left) = end.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_grant_ends_at_its_not_after_without_a_reload() {
    let up = echo_upstream().await;
    let (at, text) = utc_in(3);
    let dir = policy_dir(&format!(
        "\"pay\", {{ name = \"crm\", not_after = \"{text}\" }},\n\
         {{ name = \"old\", not_after = 2020-01-01T00:00:00Z }}"
    ));
    let datasources = format!(
        "[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://{0}/p\"\n\
         [datasources.crm]\nurl = \"http://{0}/c\"\n[datasources.old]\nurl = \"http://{0}/o\"\n",
        up.addr
    );
    std::fs::write(dir.path().join("check.toml"), &datasources).unwrap();
    let (code, out, err) = check_config(dir.path().join("check.toml"));
    assert_eq!(code, 0, "{out}{err}");
    let policy = dir.path().join("policies/callers.toml");
    assert!(
        err.contains(&format!(
            "warning: {}:4: callers.billing.datasources: the grant of data source \"old\" has already expired",
            policy.display()
        )),
        "{err}"
    );

    let sg = Sealgate::start_in(dir, &datasources);
    let get =
        |path: &'static str| async move { send(sg.proxy, with_token(path, "tok-billing-1")).await };
    assert_eq!(get("/crm/x").await.status(), 200);
    assert_eq!(
        sample_value(
            &sg.metrics(),
            "sealgate_caller_grant_expiry_timestamp_seconds{caller=\"billing\",datasource=\"crm\"}"
        ),
        Some(at as f64)
    );
    let old = assert_error(get("/old/x").await, 403, "caller_forbidden").await;
    assert_eq!(
        old["message"],
        "caller \"billing\"'s grant of data source \"old\" expired at 2020-01-01T00:00:00Z"
    );

    sleep_until_after(at).await;
    let expired = assert_error(get("/crm/x").await, 403, "caller_forbidden").await;
    let reason = format!("caller \"billing\"'s grant of data source \"crm\" expired at {text}");
    assert_eq!(expired["message"], reason.as_str());
    assert_eq!(
        get("/pay/x").await.status(),
        200,
        "the grant without end holds"
    );
    let records = sg.audit(4);
    let refused = records
        .iter()
        .find(|r| r["datasource"] == "crm" && r["status"] == 403)
        .expect("the refusal's record");
    assert_eq!(refused["decision"], "deny");
    assert_eq!(refused["reason"], reason.as_str());
    assert!(!sg
        .metrics()
        .contains("sealgate_config_reloads_total{result=\"ok\"}"));
}

#[test]
fn a_grant_written_wrong_is_a_config_error_naming_its_line() {
    let dir = policy_dir(
        "\"pay\",\n{ name = \"pay\", not_after = \"tomorrow\" },\n{ nam = \"pay\" },\n42",
    );
    let cfg = dir.path().join("sealgate.toml");
    std::fs::write(
        &cfg,
        "[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://127.0.0.1:9/\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    let policy = dir.path().join("policies/callers.toml");
    let p = policy.display();
    for want in [
        format!("{p}:4: callers.billing.datasources: not_after `tomorrow` is not a UTC time"),
        format!("{p}:5: callers.billing.datasources: unknown key `nam`"),
        format!("{p}:6: callers.billing.datasources: a grant is a data source name"),
    ] {
        assert!(err.contains(&want), "no `{want}` in:\n{err}");
    }
}
