//! Callers known by token: identification, grants, and what reaches the
//! upstream, the audit record and the metrics.

mod common;

use common::*;
use hyper::Request;

/// A config directory with the loopback policy and two token callers:
/// `billing` (tok-billing-1) granted `pay`, `crm` (tok-crm-2) granted
/// `crm_grant`.
fn two_callers(crm_grant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_loopback_policy(dir.path());
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [\"pay\"]\n\
             [callers.crm]\ntoken_sha256 = \"{}\"\ndatasources = [\"{crm_grant}\"]\n",
            sha256_hex("tok-billing-1"),
            sha256_hex("tok-crm-2")
        ),
    )
    .unwrap();
    dir
}

fn with_token(path: &str, token: Option<&str>) -> Request<BoxBody> {
    let mut req = Request::get(path).header("host", "x");
    if let Some(t) = token {
        req = req.header("proxy-authorization", format!("Bearer {t}"));
    }
    req.body(empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_callers_are_identified_and_held_to_their_grants() {
    let (up, seen) = recording_upstream().await;
    let dir = two_callers("crm");
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://{0}/p\"\n[datasources.crm]\nurl = \"http://{0}/c\"\n",
            up.addr
        ),
    );

    assert_eq!(
        send(sg.proxy, with_token("/pay/x", Some("tok-billing-1")))
            .await
            .status(),
        200
    );
    assert_eq!(
        send(sg.proxy, with_token("/crm/x", Some("tok-crm-2")))
            .await
            .status(),
        200
    );
    let v = assert_error(
        send(sg.proxy, with_token("/crm/x", Some("tok-billing-1"))).await,
        403,
        "caller_forbidden",
    )
    .await;
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("caller \"billing\" may not use data source \"crm\""),
        "{v}"
    );
    assert_error(
        send(sg.proxy, with_token("/pay/x", Some("tok-wrong"))).await,
        401,
        "caller_unauthenticated",
    )
    .await;
    assert_error(
        send(sg.proxy, with_token("/pay/x", None)).await,
        401,
        "caller_unauthenticated",
    )
    .await;
    // An unidentified caller cannot even learn which data sources exist.
    assert_error(
        send(sg.proxy, with_token("/nope/x", None)).await,
        401,
        "caller_unauthenticated",
    )
    .await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "only the two granted requests went out");
    assert!(
        seen.iter()
            .all(|r| r["headers"].get("proxy-authorization").is_none()),
        "caller tokens never go upstream"
    );

    let records = sg.audit(6);
    // Records are written as requests finish, not necessarily in order.
    let count =
        |caller: serde_json::Value| records.iter().filter(|r| r["caller"] == caller).count();
    assert_eq!(count("billing".into()), 2);
    assert_eq!(count("crm".into()), 1);
    assert_eq!(count(serde_json::Value::Null), 3);
    let forbidden = records
        .iter()
        .find(|r| r["error"] == "caller_forbidden")
        .unwrap();
    assert_eq!(
        (
            forbidden["caller"].as_str(),
            forbidden["datasource"].as_str()
        ),
        (Some("billing"), Some("crm"))
    );
    let metrics = sg.metrics();
    assert_has_samples(
        &metrics,
        &[
            r#"sealgate_requests_total{caller="billing",code="200",datasource="pay"} 1"#,
            r#"sealgate_requests_total{caller="billing",code="403",datasource="crm"} 1"#,
            r#"sealgate_requests_total{caller="-",code="401",datasource="-"} 3"#,
        ],
    );
    let everything = format!(
        "{metrics}{}{}",
        sg.stderr(),
        std::fs::read_to_string(sg.dir.path().join("audit.log")).unwrap()
    );
    assert!(
        !everything.contains("tok-billing-1") && !everything.contains("tok-wrong"),
        "caller tokens are never recorded"
    );
}

#[test]
fn caller_policy_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let policy = dir.path().join("policies/callers.toml");
    std::fs::write(
        &policy,
        format!(
            "[callers.a]\ntoken_sha256 = \"abc\"\n[callers.b]\ndatasources = [\"pay\"]\n\
             [callers.c]\ntoken_sha256 = \"{}\"\ndatasources = [\"nope\"]\n",
            sha256_hex("t")
        ),
    )
    .unwrap();
    // A misspelt identity is refused, never ignored.
    let tls = dir.path().join("policies/tls.toml");
    std::fs::write(&tls, "[callers.d]\ntoken_sha265 = \"x\"\n").unwrap();
    let cfg = dir.path().join("sealgate.toml");
    std::fs::write(&cfg, "[policy]\ndir = \"policies\"\n").unwrap();
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, 1);
    let p = policy.display();
    for want in [
        format!("{p}:2: callers.a.token_sha256: must be the SHA-256 of the token"),
        format!(
            "{p}:3: callers.b: a caller needs an identity: tls_identity, unix_uid or token_sha256"
        ),
        format!("{p}:7: callers.c.datasources: no data source named \"nope\""),
        format!(
            "{}:2: callers.d.token_sha265: unknown field `token_sha265`",
            tls.display()
        ),
    ] {
        assert!(err.contains(&want), "no `{want}` in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_callers_are_known_by_their_peer_uid() {
    use std::os::unix::fs::PermissionsExt;
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    write_loopback_policy(dir.path());
    let my_uid = nix::unistd::Uid::effective().as_raw();
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!("[callers.app]\nunix_uid = {my_uid}\ndatasources = [\"echo\"]\n"),
    )
    .unwrap();
    let socket = dir.path().join("sealgate.sock");
    let sg = Sealgate::start_in_with_proxy_keys(
        dir,
        "listen_unix = \"sealgate.sock\"",
        &format!(
            "[policy]\ndir = \"policies\"\n[datasources.echo]\nurl = \"http://{}\"\n",
            up.addr
        ),
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "owner and group only");

    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut sender = h1_over(stream).await;
    let resp = sender
        .send_request(
            Request::get("/echo/x")
                .header("host", "x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let again = sender
        .send_request(
            Request::get("/echo/y")
                .header("host", "x")
                .body(empty())
                .unwrap(),
        )
        .await
        .expect("the unix-socket connection is kept alive");
    assert_eq!(again.status(), 200);
    assert_eq!(sg.audit(2)[0]["caller"], "app");

    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED the other-uid half of unix_socket_callers_are_known_by_their_peer_uid: needs root");
        return;
    }
    // Let another uid reach the socket, so that sealgate (not the file
    // mode) is what refuses it.
    std::fs::set_permissions(sg.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket_path = socket.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                &socket_path,
                "http://x/echo/x",
            ])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "another uid is no caller"
    );
}

/// A request from a chosen loopback source address, so one test can be
/// two peers.
async fn from(source: &str, proxy: std::net::SocketAddr, token: &str) -> (u16, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(proxy).await.unwrap();
    let mut sender = h1_over(stream).await;
    let resp = sender
        .send_request(with_token("/pay/x", Some(token)))
        .await
        .unwrap();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (resp.status().as_u16(), retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_guessing_tokens_is_throttled_and_other_peers_are_not() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    write_loopback_policy(dir.path());
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [\"pay\"]\n",
            sha256_hex("tok-good")
        ),
    )
    .unwrap();
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://{}\"\n",
            up.addr
        ),
    );
    let mut statuses = Vec::new();
    for i in 0..600 {
        statuses.push(from("127.0.0.1", sg.proxy, &format!("guess-{i}")).await);
    }
    let refused = statuses.iter().filter(|(s, _)| *s == 401).count();
    let throttled: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(refused, 10, "ten failures, then throttled");
    assert_eq!(throttled.len(), 590);
    assert!(
        throttled.iter().all(|(_, r)| r.as_deref() == Some("10")),
        "Retry-After"
    );
    assert_eq!(
        from("127.0.0.1", sg.proxy, "tok-good").await.0,
        429,
        "the peer is held back whatever it presents"
    );
    assert_eq!(
        from("127.0.0.2", sg.proxy, "tok-good").await.0,
        200,
        "another peer is not"
    );
    sg.assert_metrics(&[
        r#"sealgate_caller_identification_failures_total{outcome="refused"} 10"#,
        r#"sealgate_caller_identification_failures_total{outcome="throttled"} 591"#,
    ]);
    let records = sg.audit(602);
    let throttled_record = records
        .iter()
        .find(|r| r["status"] == 429)
        .expect("a throttled request's record");
    assert_eq!(throttled_record["error"], "caller_throttled");
    assert!(throttled_record["caller"].is_null());
}

/// SPEC section 8 on the HTTP front: a caller listed under
/// `caller_credentials` reaches the data source as itself, the others with
/// the data source's credential, and its credential's echoes are redacted.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_with_its_own_credential_uses_it_and_others_use_the_data_sources() {
    let (up, seen) = recording_upstream().await;
    let dir = two_callers("pay");
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).unwrap();
    let shared = seal(&config, "pay", "token", "shared-token-aa11");
    let own = seal(
        &config,
        "pay",
        "caller_credentials.billing.token",
        "billing-token-bb22",
    );
    // An envelope sealed for one caller does not open for another.
    let (code, _, err) = check_config_with(
        &dir,
        &format!(
            "{}[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://{}/p\"\n\
             credential = {{ kind = \"bearer\", token = \"{shared}\" }}\n\
             [datasources.pay.caller_credentials.crm]\nkind = \"bearer\"\ntoken = \"{own}\"\n\
             [datasources.pay.caller_credentials.ghost]\nkind = \"bearer\"\ntoken = \"{shared}\"\n",
            keys.toml("k1"),
            up.addr
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("datasources.pay.caller_credentials.crm.token: sealed value does not open"),
        "{err}"
    );
    assert!(
        err.contains(
            "datasources.pay.caller_credentials.ghost: no caller named \"ghost\" in the policies"
        ),
        "{err}"
    );
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "{}[policy]\ndir = \"policies\"\n[datasources.pay]\nurl = \"http://{}/p\"\n\
             credential = {{ kind = \"bearer\", token = \"{shared}\" }}\n\
             [datasources.pay.caller_credentials.billing]\nkind = \"bearer\"\ntoken = \"{own}\"\n",
            keys.toml("k1"),
            up.addr
        ),
    );
    for token in ["tok-billing-1", "tok-crm-2"] {
        assert_eq!(
            send(sg.proxy, with_token("/pay/x", Some(token)))
                .await
                .status(),
            200
        );
    }
    let seen = seen.lock().unwrap().clone();
    let authorization: Vec<&str> = seen
        .iter()
        .map(|r| r["headers"]["authorization"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        authorization,
        ["Bearer billing-token-bb22", "Bearer shared-token-aa11"]
    );
    let records = sg.audit(2);
    let by: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["caller"].as_str().unwrap(),
                r["credential"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(by, [("billing", "caller"), ("crm", "datasource")]);
    let (_, listed) = http_get_blocking(sg.admin, "/v1/datasources").unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        listed[0]["caller_credentials"]["billing"],
        serde_json::json!({"kind": "bearer", "state": "ready", "token": "Encrypted on the server side"})
    );
    assert!(!listed.to_string().contains("billing-token-bb22"));
}

/// `check` on a config written into `dir` (replacing its sealgate.toml).
fn check_config_with(dir: &tempfile::TempDir, toml: &str) -> (i32, String, String) {
    let path = dir.path().join("sealgate.toml");
    std::fs::write(&path, toml).unwrap();
    check_config(&path)
}
