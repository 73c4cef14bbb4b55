//! OAuth2 client-credentials data sources end to end (SPEC section 11): a
//! token endpoint written here from RFC 6749 (it checks the client's
//! authentication, basic or in the form, and the grant), behind TLS made
//! by the test, and a resource server that accepts only the tokens it
//! issued and still valid.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};

const CLIENT_ID: &str = "crm sync";
const CLIENT_SECRET: &str = "oauth-client-secret-6c1f:09";

/// What the token endpoint answers next.
#[derive(Clone)]
enum Answer {
    /// A token living this many seconds.
    Token(i64),
    /// A status and a body (which echoes the secret, as some do).
    Status(u16),
    NotJson,
    NoToken,
    ExpiresIn(serde_json::Value),
    Redirect,
}

#[derive(Default)]
struct Issuer {
    next: AtomicU64,
    /// Valid tokens and when they stop being valid.
    valid: Mutex<HashMap<String, Instant>>,
    /// Every token request's form, without the secret.
    requests: Mutex<Vec<HashMap<String, String>>>,
    answer: Mutex<Option<Answer>>,
}

fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

impl Issuer {
    fn answer(&self, a: Answer) {
        *self.answer.lock().unwrap() = Some(a);
    }

    fn fetches(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// RFC 6749 2.3.1 and 4.4: the client authenticates by Basic (id and
    /// secret form-encoded, then base64) or in the body, never both.
    fn authenticated(&self, basic: Option<&str>, form: &HashMap<String, String>) -> bool {
        let in_body = (form.get("client_id"), form.get("client_secret"));
        match (basic, in_body) {
            (Some(value), (None, None)) => {
                let Some(decoded) = value
                    .strip_prefix("Basic ")
                    .and_then(|b| STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                else {
                    return false;
                };
                let Some((id, secret)) = decoded.split_once(':') else {
                    return false;
                };
                let id = form_decode(id);
                let secret = form_decode(secret);
                id == CLIENT_ID && secret == CLIENT_SECRET
            }
            (None, (Some(id), Some(secret))) => id == CLIENT_ID && secret == CLIENT_SECRET,
            _ => false,
        }
    }

    async fn serve(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<BoxBody> {
        let basic = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type_ok = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-www-form-urlencoded");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut fields = form(&body);
        let ok = content_type_ok
            && fields.get("grant_type").map(String::as_str) == Some("client_credentials")
            && self.authenticated(basic.as_deref(), &fields);
        fields.remove("client_secret");
        self.requests.lock().unwrap().push(fields);
        let json = |status: u16, v: serde_json::Value| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full(v.to_string()))
                .unwrap()
        };
        if !ok {
            return json(
                401,
                serde_json::json!({"error": "invalid_client", "error_description": format!("bad secret for {CLIENT_SECRET}")}),
            );
        }
        let answer = self
            .answer
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(Answer::Token(3600));
        match answer {
            Answer::Token(seconds) => {
                let token = format!(
                    "at-{}-{}",
                    self.next.fetch_add(1, Ordering::SeqCst),
                    random_password()
                );
                let until = Instant::now() + Duration::from_secs(seconds.max(0) as u64);
                self.valid.lock().unwrap().insert(token.clone(), until);
                json(
                    200,
                    serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": seconds}),
                )
            }
            Answer::Status(status) => json(
                status,
                serde_json::json!({"error": "temporarily_unavailable", "error_description": CLIENT_SECRET}),
            ),
            Answer::NotJson => Response::builder()
                .status(200)
                .body(full(format!("<html>{CLIENT_SECRET}</html>")))
                .unwrap(),
            Answer::NoToken => json(
                200,
                serde_json::json!({"token_type": "Bearer", "expires_in": 60}),
            ),
            Answer::ExpiresIn(v) => json(
                200,
                serde_json::json!({"access_token": "at-odd", "expires_in": v}),
            ),
            Answer::Redirect => Response::builder()
                .status(302)
                .header("location", "https://elsewhere.example/token")
                .body(full(""))
                .unwrap(),
        }
    }

    /// The resource server: 200 for a token it issued and still valid.
    async fn resource(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<BoxBody> {
        let path_echoes = req.uri().path().ends_with("/echo");
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let valid = token.as_ref().is_some_and(|t| {
            self.valid
                .lock()
                .unwrap()
                .get(t)
                .is_some_and(|until| Instant::now() < *until)
        });
        let status = if valid { 200 } else { 401 };
        // A debug endpoint that quotes the request's credential back.
        let echo = token.filter(|_| path_echoes).unwrap_or_default();
        Response::builder()
            .status(status)
            .header("x-seen-token", echo)
            .body(full(if valid { "hello" } else { "no" }))
            .unwrap()
    }
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

struct Fixture {
    issuer: Arc<Issuer>,
    sg: Sealgate,
}

/// sealgate with data source `crm` (oauth2 with `client_auth`) in front of
/// the resource server; the token endpoint on TLS from the test CA.
async fn fixture(client_auth: &str, rust_log: &str) -> Fixture {
    fixture_with(client_auth, rust_log, "").await
}

/// The same, with `extra` config before the data source (`{sealed:NAME}`
/// in it becomes a client secret sealed for data source NAME).
async fn fixture_with(client_auth: &str, rust_log: &str, extra: &str) -> Fixture {
    fixture_clocked(client_auth, rust_log, extra, None).await
}

/// libfaketime, from Debian's faketime package (`./dev.sh` installs it).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The same, with sealgate's wall clock read from `clock` (libfaketime's
/// offset file, e.g. `+0` then `+2h`); its monotonic clock stays true.
async fn fixture_clocked(
    client_auth: &str,
    rust_log: &str,
    extra: &str,
    clock: Option<std::path::PathBuf>,
) -> Fixture {
    let issuer = Arc::new(Issuer::default());
    let ca = TestCa::new("oauth2 test CA");
    let endpoint = {
        let issuer = issuer.clone();
        upstream(
            handler(move |req| issuer.clone().serve(req)),
            Some(ca.server_config(&["localhost"])),
        )
        .await
    };
    let resource = {
        let issuer = issuer.clone();
        upstream(handler(move |req| issuer.clone().resource(req)), None).await
    };
    let client_auth = client_auth.to_string();
    let rust_log = rust_log.to_string();
    let extra = extra.to_string();
    let clock = clock.clone();
    let sg = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).unwrap();
        ca.write_pem(&dir.path().join("ca.pem"));
        let sealed = seal(&config, "crm", "client_secret", CLIENT_SECRET);
        // A host the policy allows by name whose address the deny list
        // blocks (link-local, the cloud metadata service's).
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/metadata.toml"),
            "[egress]\nallow = [\"169.254.169.254\"]\n",
        )
        .unwrap();
        let mut extra = extra;
        while let Some(at) = extra.find("{sealed:") {
            let end = at + extra[at..].find('}').unwrap();
            let sealed = seal(&config, &extra[at + 8..end], "client_secret", CLIENT_SECRET);
            extra.replace_range(at..=end, &sealed);
        }
        let toml = format!(
            "{extra}\n{}\n[datasources.crm]\nurl = \"http://{}/api\"\nca_file = \"ca.pem\"\n\
             credential = {{ kind = \"oauth2\", token_url = \"https://localhost:{}/oauth2/token\", \
             client_id = \"{CLIENT_ID}\", client_secret = \"{sealed}\", client_auth = \"{client_auth}\", \
             scopes = [\"crm.read\", \"crm.write\"], params = {{ audience = \"https://api.example.com\" }} }}\n",
            keys.toml("k1"),
            resource.addr,
            endpoint.addr.port()
        );
        if let Some(clock) = &clock {
            std::fs::write(
                dir.path().join("env"),
                format!(
                    "LD_PRELOAD={FAKETIME_LIB}\nFAKETIME_TIMESTAMP_FILE={}\nFAKETIME_NO_CACHE=1\nFAKETIME_DONT_FAKE_MONOTONIC=1\n",
                    clock.display()
                ),
            )
            .unwrap();
        }
        Sealgate::start_logging(dir, &toml, &rust_log)
    })
    .await
    .unwrap();
    Fixture { issuer, sg }
}

impl Fixture {
    async fn get(&self) -> (u16, serde_json::Value) {
        let resp = get(self.sg.proxy, "/crm/records").await;
        let status = resp.status().as_u16();
        let body = body_bytes(resp).await;
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_fetched_once_with_basic_or_post_authentication_and_reused() {
    for auth in ["basic", "post"] {
        let f = fixture(auth, "info").await;
        for _ in 0..20 {
            assert_eq!(f.get().await.0, 200, "{auth}");
        }
        assert_eq!(f.issuer.fetches(), 1, "{auth}: one fetch for 20 requests");
        let request = f.issuer.requests.lock().unwrap()[0].clone();
        assert_eq!(
            request.get("scope").map(String::as_str),
            Some("crm.read crm.write")
        );
        assert_eq!(
            request.get("audience").map(String::as_str),
            Some("https://api.example.com")
        );
        assert_eq!(
            request.contains_key("client_id"),
            auth == "post",
            "{auth}: {request:?}"
        );
        f.sg.assert_metrics(&[
            "sealgate_credential_refreshes_total{datasource=\"crm\",result=\"ok\"} 1",
        ]);
        let expiry = f
            .sg
            .metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("sealgate_credential_expiry_timestamp_seconds{datasource=\"crm\"} ")
                    .map(str::to_string)
            })
            .and_then(|v| v.parse::<f64>().ok())
            .expect("the expiry gauge");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((expiry - now - 3600.0).abs() < 30.0, "{expiry} vs {now}");
        let events = f.sg.audit_events();
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "credential_refresh" && e["result"] == "ok"),
            "{events:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_token_is_refreshed_ahead_of_expiry_and_a_burst_at_expiry_fetches_once() {
    let f = fixture("basic", "info").await;
    f.issuer.answer(Answer::Token(4));
    assert_eq!(f.get().await.0, 200);
    assert_eq!(f.issuer.fetches(), 1);
    // A quarter of 4 s is left at 3 s: the next request starts a refresh
    // in the background and is served with the current token.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(f.get().await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.issuer.fetches(), 2, "refreshed about 1 s before expiry");
    // Requests at 100 ms intervals for 3 s fetch no more.
    for _ in 0..25 {
        assert_eq!(f.get().await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        f.issuer.fetches() <= 3,
        "not a fetch per request: {}",
        f.issuer.fetches()
    );

    // Let the token lapse, then 1,000 requests at once: exactly one fetch.
    f.issuer.answer(Answer::Token(3600));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = f.issuer.fetches();
    let burst = (0..1000).map(|_| get(f.sg.proxy, "/crm/records"));
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).count()
    );
    assert_eq!(f.issuer.fetches() - before, 1, "one fetch for the burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_the_data_source_triggers_one_early_refresh() {
    let f = fixture("basic", "info").await;
    assert_eq!(f.get().await.0, 200);
    // The resource server forgets the token (revoked).
    f.issuer.valid.lock().unwrap().clear();
    let (status, _) = f.get().await;
    assert_eq!(status, 401, "the request itself is not retried");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.issuer.fetches(), 2);
    assert_eq!(f.get().await.0, 200, "the new token works");
    assert_eq!(f.issuer.fetches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_faults_answer_503_and_never_pass_the_endpoints_words() {
    let f = fixture("post", "info").await;
    let cases = [
        (
            Answer::Status(503),
            "http_error",
            "the token endpoint answered 503 (temporarily_unavailable)",
        ),
        (
            Answer::Status(400),
            "refused",
            "the token endpoint answered 400 (temporarily_unavailable)",
        ),
        (Answer::NotJson, "invalid", "not JSON"),
        (Answer::NoToken, "invalid", "has no access_token"),
        (
            Answer::ExpiresIn(serde_json::json!(0)),
            "invalid",
            "expires_in",
        ),
        (
            Answer::ExpiresIn(serde_json::json!(-5)),
            "invalid",
            "expires_in",
        ),
        (
            Answer::ExpiresIn(serde_json::json!(99_999_999_999u64)),
            "invalid",
            "expires_in",
        ),
        (
            Answer::Redirect,
            "http_error",
            "the token endpoint answered 302",
        ),
    ];
    for (answer, result, text) in cases {
        // A failure is answered for a second before the endpoint is asked
        // again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        f.issuer.answer(answer);
        let (status, body) = f.get().await;
        assert_eq!(status, 503, "{text}: {body}");
        assert_eq!(body["error"], "credential_unavailable", "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(text), "{message}");
        assert!(!message.contains(CLIENT_SECRET), "{message}");
        f.sg.assert_metrics(&[&format!(
            "sealgate_credential_refreshes_total{{datasource=\"crm\",result=\"{result}\"}}"
        )]);
    }
    // While it fails, the endpoint is asked about once a second, not once
    // per request.
    let before = f.issuer.fetches();
    for _ in 0..30 {
        assert_eq!(f.get().await.0, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = f.issuer.fetches() - before;
    assert!((1..=3).contains(&asked), "asked {asked} times in 1.5 s");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A token that works, then the endpoint fails: the token stays in use
    // until it expires.
    f.issuer.answer(Answer::Token(4));
    assert_eq!(f.get().await.0, 200);
    f.issuer.answer(Answer::Status(500));
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        f.get().await.0,
        200,
        "the last token serves while a refresh fails"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(f.get().await.0, 503, "and not after it expired");
    for (stream, text) in [("stderr", f.sg.stderr()), ("stdout", f.sg.stdout())] {
        assert!(!text.contains(CLIENT_SECRET), "{stream}");
        assert!(!text.contains("bad secret"), "{stream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shows_the_token_state_and_expires_at_feeds_the_gauge_and_a_denied_token_host_is_refused(
) {
    let extra = "[datasources.odd]\nurl = \"http://127.0.0.1:1/x\"\n\
                 credential = { kind = \"oauth2\", token_url = \"https://10.9.9.9/token\", client_id = \"a\", \
                 client_secret = \"{sealed:odd}\", expires_at = \"2027-03-01T00:00:00Z\" }\n\
                 [datasources.meta]\nurl = \"http://127.0.0.1:1/x\"\n\
                 credential = { kind = \"oauth2\", token_url = \"https://169.254.169.254/token\", client_id = \"a\", \
                 client_secret = \"{sealed:meta}\" }\n";
    let f = fixture_with("basic", "info", extra).await;
    let sg = &f.sg;
    let listing = || -> serde_json::Value {
        let (_, body) = http_get_blocking(sg.admin, "/v1/datasources").unwrap();
        let all: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        all.into_iter().find(|d| d["name"] == "crm").unwrap()["credential"].clone()
    };
    let before = tokio::task::block_in_place(listing);
    assert_eq!(before["kind"], "oauth2");
    assert_eq!(before["client_secret"], "Encrypted on the server side");
    assert_eq!(before["token"]["state"], "none", "{before}");
    assert_eq!(f.get().await.0, 200);
    let after = tokio::task::block_in_place(listing);
    assert_eq!(after["token"]["state"], "fresh", "{after}");
    assert!(
        after["token"]["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{after}"
    );
    f.sg.assert_metrics(&[
        "sealgate_credential_expiry_timestamp_seconds{datasource=\"odd\"} 1803859200",
    ]);
    // Nothing is fetched from a token host the policy does not allow
    // (10.9.9.9), nor from one it allows whose address the deny list
    // blocks (link-local).
    for (ds, why) in [
        ("odd", "the token host is not allowed"),
        ("meta", "169.254.169.254"),
    ] {
        let resp = get(f.sg.proxy, &format!("/{ds}/x")).await;
        assert_eq!(resp.status().as_u16(), 503, "{ds}");
        let body = json(resp).await;
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{ds}: {body}");
        f.sg.assert_metrics(&[&format!(
            "sealgate_credential_refreshes_total{{datasource=\"{ds}\",result=\"egress_denied\"}} 1"
        )]);
    }
    let (code, _, err) =
        tokio::task::block_in_place(|| check_config(f.sg.dir.path().join("sealgate.toml")));
    assert_ne!(code, 0);
    assert!(
        err.contains("datasources.odd.credential.token_url: egress denied for the token endpoint"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_secret_or_token_appears_anywhere_at_trace_level() {
    let f = fixture("basic", "trace").await;
    let mut seen = Vec::new();
    for path in ["/crm/records", "/crm/echo", "/crm/echo"] {
        let resp = get(f.sg.proxy, path).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        seen.extend_from_slice(format!("{:?}", resp.headers()).as_bytes());
        seen.extend_from_slice(&body_bytes(resp).await);
    }
    // A failing endpoint that echoes the secret in its error body.
    let tokens: Vec<String> = f.issuer.valid.lock().unwrap().keys().cloned().collect();
    f.issuer.valid.lock().unwrap().clear();
    f.issuer.answer(Answer::Status(500));
    let resp = get(f.sg.proxy, "/crm/records").await;
    seen.extend_from_slice(&body_bytes(resp).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut secrets = vec![CLIENT_SECRET.to_string()];
    secrets.extend(tokens);
    f.sg.assert_secrets_nowhere(&seen, &secrets);
    f.sg.assert_metrics(&[
        "sealgate_secrets_scrubbed_total{datasource=\"crm\",where=\"header\"} 2",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_down_or_silent_answers_503_in_bounded_time() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().flatten().collect();
        drop(held);
    });
    let extra = format!(
        "[datasources.down]\nurl = \"http://127.0.0.1:1/x\"\nconnect_timeout_ms = 500\ntimeout_ms = 500\n\
         credential = {{ kind = \"oauth2\", token_url = \"http://127.0.0.1:{REFUSING_PORT}/token\", client_id = \"a\", client_secret = \"{{sealed:down}}\" }}\n\
         [datasources.silent]\nurl = \"http://127.0.0.1:1/x\"\nconnect_timeout_ms = 500\ntimeout_ms = 500\n\
         credential = {{ kind = \"oauth2\", token_url = \"http://127.0.0.1:{silent_port}/token\", client_id = \"a\", client_secret = \"{{sealed:silent}}\" }}\n"
    );
    let f = fixture_with("basic", "info", &extra).await;
    for (ds, text, result) in [
        ("down", "connecting to 127.0.0.1:1", "unreachable"),
        ("silent", "did not finish within 500 ms", "unreachable"),
    ] {
        let started = Instant::now();
        let resp = get(f.sg.proxy, &format!("/{ds}/x")).await;
        assert_eq!(resp.status().as_u16(), 503, "{ds}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{ds}: bounded by the data source's timeouts"
        );
        let body = json(resp).await;
        assert!(
            body["message"].as_str().unwrap_or_default().contains(text),
            "{ds}: {body}"
        );
        f.sg.assert_metrics(&[&format!(
            "sealgate_credential_refreshes_total{{datasource=\"{ds}\",result=\"{result}\"}} 1"
        )]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_neither_expires_nor_prolongs_a_token() {
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = clock_dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let f = fixture_clocked("basic", "info", "", Some(clock.clone())).await;
    f.issuer.answer(Answer::Token(4));
    assert_eq!(f.get().await.0, 200);
    // The wall clock jumps two hours ahead: the 4-second token is not
    // taken for expired (no fetch, no 503).
    std::fs::write(&clock, "+2h\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.get().await.0, 200);
    assert_eq!(
        f.issuer.fetches(),
        1,
        "a clock step forward fetched a token"
    );
    // The record is stamped as the request is logged, after its response
    // reached the client: the clock stays until it is written.
    assert_eq!(f.sg.audit(2).len(), 2);
    // And back two hours: the token still ends on time (4 s of real time).
    std::fs::write(&clock, "-2h\n").unwrap();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    f.issuer.answer(Answer::Token(3600));
    assert_eq!(f.get().await.0, 200);
    assert_eq!(f.issuer.fetches(), 2, "the token expired on real time");
    // The clock was faked indeed: the record of the request made at +2 h
    // is stamped four hours after the one made at -2 h.
    let records = f.sg.audit(3);
    let hour = |r: &serde_json::Value| -> u32 {
        r["ts"]
            .as_str()
            .and_then(|t| t.get(11..13))
            .and_then(|h| h.parse().ok())
            .unwrap_or(99)
    };
    assert_eq!(
        (hour(&records[1]) + 24 - hour(&records[2])) % 24,
        4,
        "{records:#?}"
    );
}
