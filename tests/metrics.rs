//! The metrics exposition after a mix of requests: exact label values, and
//! promtool's verdict on the format.

mod common;

use common::*;
use hyper::Request;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_allowed_denied_and_failed_requests() {
    let up = echo_upstream().await;
    let sg = Sealgate::start(&format!(
        "[datasources.ok]\nurl = \"http://{}\"\n\
         [datasources.down]\nurl = \"http://127.0.0.1:{REFUSING_PORT}\"\n\
         [datasources.outside]\nurl = \"https://not-allowed.example.net\"\n",
        up.addr
    ));
    let post = Request::post("/ok/x")
        .header("host", "x")
        .body(full("hello"))
        .unwrap();
    assert_eq!(send(sg.proxy, post).await.status(), 200);
    assert_eq!(get(sg.proxy, "/ok/y").await.status(), 200);
    assert_eq!(get(sg.proxy, "/down/x").await.status(), 502);
    assert_eq!(get(sg.proxy, "/outside/x").await.status(), 403);
    assert_eq!(get(sg.proxy, "/nope/x").await.status(), 404);
    sg.audit(5);

    let text = sg.metrics();
    assert_has_samples(
        &text,
        &[
            r#"sealgate_requests_total{caller="local",code="200",datasource="ok"} 2"#,
            r#"sealgate_requests_total{caller="local",code="502",datasource="down"} 1"#,
            r#"sealgate_requests_total{caller="local",code="403",datasource="outside"} 1"#,
            r#"sealgate_requests_total{caller="local",code="404",datasource="-"} 1"#,
            r#"sealgate_egress_denied_total{datasource="outside",reason="no_allow_entry"} 1"#,
            r#"sealgate_upstream_errors_total{datasource="down",kind="connect"} 1"#,
            r#"sealgate_request_bytes_total{datasource="ok"} 5"#,
            r#"sealgate_request_duration_seconds_count{datasource="ok"} 2"#,
            "sealgate_active_requests 0",
            "sealgate_audit_dropped_total 0",
            &format!(
                "sealgate_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ],
    );
    let response_bytes =
        sample_value(&text, r#"sealgate_response_bytes_total{datasource="ok"}"#).unwrap_or(0.0);
    assert!(response_bytes > 0.0, "{text}");
    // Labels come from config only: never a path, a host or an error text.
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    for leak in ["/ok/x", "not-allowed.example.net", "refused"] {
        assert!(
            samples.iter().all(|l| !l.contains(leak)),
            "`{leak}` in a sample:\n{text}"
        );
    }

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(_) => eprintln!("SKIPPED promtool check: promtool is not installed (apt-get install --no-install-recommends prometheus); CI runs it"),
        Ok(mut child) => {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
