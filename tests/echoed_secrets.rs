//! An upstream that echoes the injected credential in every part of a
//! response head, well-formed or not, over h1 and h2: the caller and
//! everything sealgate writes (stdout, stderr at trace, audit, metrics)
//! are scanned for the secret in every encoding a client could decode.

mod common;

use std::net::SocketAddr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use tokio::io::AsyncWriteExt;

/// `+`, `~` and `_` make the base64 and percent forms differ from the
/// secret; letters of both cases make the case-insensitive match matter.
const TOKEN: &str = "sgTok+9Qz~x_Kd7";

/// What the echoing upstream answers for each path: `{}` stands for the
/// token it received.
fn echo_head(path: &str, token: &str) -> String {
    let bearer = format!("Bearer {token}");
    match path {
        "/reason" => format!("HTTP/1.1 200 {token}\r\nContent-Length: 2\r\n\r\nok"),
        "/name" => format!(
            "HTTP/1.1 200 OK\r\n{token}: 1\r\nX-{token}-Suffix: 2\r\nContent-Length: 2\r\n\r\nok"
        ),
        "/encodings" => {
            let values = [
                token.to_uppercase(),
                token.to_lowercase(),
                STANDARD.encode(token),
                URL_SAFE_NO_PAD.encode(token),
                STANDARD.encode(&bearer),
                URL_SAFE_NO_PAD.encode(&bearer),
                STANDARD.encode(format!("x{token}")),
                percent(token, true),
                percent(token, false),
                token.replace('+', "%2B").replace('/', "%2f"),
                percent(&percent(token, true), false),
            ];
            let mut head = "HTTP/1.1 200 OK\r\n".to_string();
            for (i, v) in values.iter().enumerate() {
                head.push_str(&format!("X-Echo-{i}: v={v};\r\n"));
            }
            head.push_str("X-Innocent: fine\r\nContent-Length: 2\r\n\r\nok");
            head
        }
        "/early" => format!(
            "HTTP/1.1 103 Early {token}\r\nLink: </{token}>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ),
        "/trailers" => format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Echo\r\n\r\n\
             2\r\nok\r\n0\r\nX-Echo: {token}\r\n\r\n"
        ),
        // Malformed heads: pingora refuses them, and its error carries the
        // raw bytes it could not parse.
        "/bad-name" => {
            format!("HTTP/1.1 200 OK\r\nBad Name {token}: 1\r\nContent-Length: 2\r\n\r\nok")
        }
        "/many-headers" => {
            let mut head = "HTTP/1.1 200 OK\r\n".to_string();
            for i in 0..300 {
                head.push_str(&format!("X-{i}: {token}\r\n"));
            }
            head + "Content-Length: 2\r\n\r\nok"
        }
        "/bad-chunk" => format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{token}\r\nok\r\n0\r\n\r\n"
        ),
        "/bad-length" => format!("HTTP/1.1 200 OK\r\nContent-Length: {token}\r\n\r\nok"),
        "/bad-status" => format!("HTTP/1.1 2x0 {token}\r\nContent-Length: 2\r\n\r\nok"),
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
    }
}

async fn echoing_upstream() -> SocketAddr {
    raw_upstream(|mut stream| async move {
        let head = read_head(&mut stream).await;
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let token = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().trim_start_matches("Bearer ").to_string())
            })
            .unwrap_or_default();
        let _ = stream.write_all(echo_head(&path, &token).as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await
}

fn start_with_bearer(upstream: SocketAddr) -> Sealgate {
    start_with_bearer_at(&format!("http://{upstream}"), None)
}

fn start_with_bearer_at(url: &str, ca: Option<&TestCa>) -> Sealgate {
    Sealgate::with_bearer(TOKEN, url, ca, "", "trace")
}

fn forms() -> Vec<String> {
    secret_forms(TOKEN, &[&format!("Bearer {TOKEN}")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_part_of_a_response_head_carries_the_secret_to_the_caller() {
    let upstream = echoing_upstream().await;
    let sg = start_with_bearer(upstream);
    let forms = forms();
    let mut answers = Vec::new();
    for path in ["/reason", "/name", "/encodings", "/early", "/trailers"] {
        let request = format!(
            "GET /echo{path} HTTP/1.1\r\nHost: sealgate\r\nTE: trailers\r\nConnection: close\r\n\r\n"
        );
        let seen = raw_exchange(sg.proxy, request.as_bytes()).await;
        assert_no_secret(&format!("the answer to {path}"), &seen, &forms);
        answers.push((path, String::from_utf8_lossy(&seen).into_owned()));
    }
    let answer = |p: &str| &answers.iter().find(|(path, _)| *path == p).unwrap().1;
    assert!(
        answer("/reason").starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        answer("/reason")
    );
    assert!(answer("/name").ends_with("ok"), "{}", answer("/name"));
    let encodings = answer("/encodings");
    for i in 0..11 {
        assert!(
            encodings.contains(&format!("x-echo-{i}: [redacted]"))
                || encodings.contains(&format!("X-Echo-{i}: [redacted]")),
            "X-Echo-{i} in {encodings}"
        );
    }
    assert!(encodings.contains("fine"), "{encodings}");
    assert!(answer("/early").contains("200 OK"), "{}", answer("/early"));

    let scrubbed = sample_value(
        &sg.metrics(),
        "sealgate_secrets_scrubbed_total{datasource=\"echo\",where=\"header\"}",
    );
    // The reason 1, names 2, encodings 11, the 1xx's reason and link 2;
    // pingora passes no h1 trailers on to an h1 caller.
    assert_eq!(scrubbed, Some(16.0));
    drop(assert_nothing_written(&sg, &forms));
}

/// pingora refuses these heads, and the error it would log carries the raw
/// bytes: the caller gets a 502 and no log line, audit record or metric
/// shows the secret, at RUST_LOG=trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_echoing_head_leaves_the_secret_in_no_log() {
    let upstream = echoing_upstream().await;
    let sg = start_with_bearer(upstream);
    let forms = forms();
    for path in [
        "/bad-name",
        "/many-headers",
        "/bad-chunk",
        "/bad-length",
        "/bad-status",
    ] {
        let request =
            format!("GET /echo{path} HTTP/1.1\r\nHost: sealgate\r\nConnection: close\r\n\r\n");
        let seen = raw_exchange(sg.proxy, request.as_bytes()).await;
        assert_no_secret(&format!("the answer to {path}"), &seen, &forms);
    }
    let records = sg.audit(5);
    assert_eq!(records.len(), 5, "{records:?}");
    let stderr = assert_nothing_written(&sg, &forms);
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "trace logging was on"
    );
    assert!(stderr.contains("request failed"), "{stderr}");
}

/// Scans stdout, stderr, the audit file and a metrics scrape; returns stderr.
fn assert_nothing_written(sg: &Sealgate, forms: &[String]) -> String {
    let audit = std::fs::read(sg.dir.path().join("audit.log")).unwrap_or_default();
    assert_no_secret("the audit trail", &audit, forms);
    assert_no_secret("metrics", sg.metrics().as_bytes(), forms);
    assert_no_secret("stdout", sg.stdout().as_bytes(), forms);
    let stderr = sg.stderr();
    assert_no_secret("stderr", stderr.as_bytes(), forms);
    stderr
}

/// Over h2 the upstream's header names are its own too, and trailers come
/// through: a name or trailer carrying the secret is dropped or redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_echoing_in_header_names_and_trailers_is_redacted() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let ca = TestCa::new("echo CA");
    let up = upstream(
        handler(|req: hyper::Request<hyper::body::Incoming>| async move {
            assert_eq!(req.version(), hyper::Version::HTTP_2);
            let sent = bearer_of(&req);
            // h2 header names are lower case.
            let token = sent.to_lowercase();
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("x-echo", token.parse().expect("value"));
            trailers.insert(
                hyper::header::HeaderName::from_bytes(token.as_bytes()).expect("name"),
                "1".parse().expect("value"),
            );
            let frames = vec![
                Ok::<_, std::io::Error>(Frame::data(bytes::Bytes::from_static(b"ok"))),
                Ok(Frame::trailers(trailers)),
            ];
            hyper::Response::builder()
                .header(token.as_str(), "1")
                .header("x-b64", STANDARD.encode(&sent))
                .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
                .expect("response")
        }),
        Some(ca.server_config(&["localhost"])),
    )
    .await;
    let sg = start_with_bearer_at(&format!("https://localhost:{}", up.addr.port()), Some(&ca));
    let forms = forms();
    let seen = raw_exchange(
        sg.proxy,
        b"GET /echo/x HTTP/1.1\r\nHost: sealgate\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&seen);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("x-b64: [redacted]"), "{answer}");
    assert_no_secret("the h2 answer", &seen, &forms);
    let scrubbed = sample_value(
        &sg.metrics(),
        "sealgate_secrets_scrubbed_total{datasource=\"echo\",where=\"header\"}",
    );
    // The name and the base64 value in the head, both trailers.
    assert_eq!(scrubbed, Some(4.0));
    assert_nothing_written(&sg, &forms);
}

/// An upstream that sends back everything it was sent: the request target
/// as its reason phrase, and every request header value and the target in
/// every encoding as response headers. It does not know which of them
/// carries the credential.
async fn reflecting_upstream() -> SocketAddr {
    raw_upstream(|mut stream| async move {
        let head = read_head(&mut stream).await;
        let target = head.split(' ').nth(1).unwrap_or("/").to_string();
        let mut carried: Vec<String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
            .collect();
        carried.push(target.clone());
        let mut answer = format!("HTTP/1.1 200 {target}\r\n");
        for (i, value) in carried.iter().enumerate() {
            for (j, shown) in [
                value.to_uppercase(),
                value.to_lowercase(),
                STANDARD.encode(value),
                URL_SAFE_NO_PAD.encode(value),
                percent(value, true),
                value.bytes().map(|b| format!("{b:02x}")).collect(),
            ]
            .iter()
            .enumerate()
            {
                answer.push_str(&format!("X-Reflect-{i}-{j}: {shown}\r\n"));
            }
        }
        answer.push_str("Content-Length: 2\r\n\r\nok");
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await
}

/// Every credential kind, its secret reflected in every form: none reaches
/// the caller or anything sealgate writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_kind_of_credential_comes_back_through_a_reflecting_upstream() {
    let upstream = reflecting_upstream().await;
    const SECRET: &str = "Kd7~sgTok+9Qz x_";
    let kinds: [(&str, &str, &str, Vec<String>); 4] = [
        ("bearer", "token", "", vec![format!("Bearer {SECRET}")]),
        (
            "basic",
            "password",
            "username = \"svc\", ",
            vec![
                format!("svc:{SECRET}"),
                STANDARD.encode(format!("svc:{SECRET}")),
                format!("Basic {}", STANDARD.encode(format!("svc:{SECRET}"))),
            ],
        ),
        ("header", "value", "name = \"X-API-Key\", ", vec![]),
        ("query", "value", "name = \"api_key\", ", vec![]),
    ];
    for (kind, field, public, carriers) in kinds {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).expect("config");
        let sealed = seal(&config, "echo", field, SECRET);
        let sg = Sealgate::start_logging(
            dir,
            &format!(
                "{}\n[datasources.echo]\nurl = \"http://{upstream}\"\n\
                 credential = {{ kind = \"{kind}\", {public}{field} = \"{sealed}\" }}\n",
                keys.toml("k1")
            ),
            "trace",
        );
        let carriers: Vec<&str> = carriers.iter().map(String::as_str).collect();
        let forms = secret_forms(SECRET, &carriers);
        let seen = raw_exchange(
            sg.proxy,
            b"GET /echo/x?a=1 HTTP/1.1\r\nHost: sealgate\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_no_secret(&format!("the {kind} answer"), &seen, &forms);
        let answer = String::from_utf8_lossy(&seen);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{kind}: {answer}"
        );
        assert!(answer.contains("[redacted]"), "{kind}: {answer}");
        assert_nothing_written(&sg, &forms);
    }
}
