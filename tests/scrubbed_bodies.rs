//! Upstreams that echo the injected credential in the response body, in
//! every encoding, written in small pieces so each form is split across
//! reads, h1 chunks, TLS records and h2 DATA frames: the caller gets a
//! body of the same length with every form overwritten and every other
//! byte as sent (SPEC 12).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Request;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

/// `+`, `/`, `~` and `_` make every encoding differ from the token.
const TOKEN: &str = "sgTok+9Q/z~x_Kd7";

/// The body an echoing upstream sends: innocent text between the forms a
/// body can carry the token in, as (bytes, carries the token) segments.
fn echoed_body(token: &str) -> Vec<(String, bool)> {
    let forms = [
        token.to_string(),
        token.to_uppercase(),
        token.to_lowercase(),
        token.bytes().map(|b| format!("{b:02x}")).collect(),
        STANDARD.encode(token),
        URL_SAFE_NO_PAD.encode(format!("x{token}")),
        STANDARD.encode(format!("Bearer {token}")),
        percent(token, true),
        percent(token, false),
        token.replace('+', "%2B").replace('/', "%2F"),
        token
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('~', "%7E"),
        token.replace('/', "\\/"),
        format!("Bearer {token}"),
    ];
    let mut body = vec![("{\"echo\":[\n".to_string(), false)];
    for (i, form) in forms.into_iter().enumerate() {
        body.push((form, true));
        body.push((format!("\",\n<kept {i}>\"\n"), false));
    }
    body
}

/// Checks what the caller got against what the upstream sent: the same
/// length, innocent text unchanged, every form a run of `*`.
fn assert_scrubbed(received: &[u8], segments: &[(String, bool)]) {
    let sent: String = segments.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        received.len(),
        sent.len(),
        "{}",
        String::from_utf8_lossy(received)
    );
    let mut at = 0;
    for (text, carries) in segments {
        let got = &received[at..at + text.len()];
        if *carries {
            assert!(got.contains(&b'*'), "not masked: {text}");
            assert!(
                got.iter()
                    .zip(text.bytes())
                    .all(|(&g, s)| g == s || g == b'*'),
                "{}",
                String::from_utf8_lossy(got)
            );
        } else {
            assert_eq!(got, text.as_bytes(), "innocent text changed");
        }
        at += text.len();
    }
    let forms = secret_forms(TOKEN, &[&format!("Bearer {TOKEN}")]);
    assert_no_secret("the scrubbed body", received, &forms);
}

fn form_count(segments: &[(String, bool)]) -> f64 {
    segments.iter().filter(|(_, c)| *c).count() as f64
}

fn scrubbed(sg: &Sealgate, place: &str) -> Option<f64> {
    sample_value(
        &sg.metrics(),
        &format!("sealgate_secrets_scrubbed_total{{datasource=\"echo\",where=\"{place}\"}}"),
    )
}

/// Answers with the echoed body of the token it was sent, written a few
/// bytes at a time (each write its own TLS record), framed by length
/// (`/length`) or as one chunk per piece (`/chunked`).
async fn answer_in_pieces<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let head = read_head(&mut stream).await;
    let token = head
        .lines()
        .find_map(|l| l.strip_prefix("authorization: Bearer "))
        .or_else(|| {
            head.lines()
                .find_map(|l| l.strip_prefix("Authorization: Bearer "))
        })
        .unwrap_or_default()
        .to_string();
    let chunked = head.starts_with("GET /chunked");
    heads.lock().unwrap().push(head);
    let body: String = echoed_body(&token).into_iter().map(|(s, _)| s).collect();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let (mut at, mut step) = (0, 0);
    let sizes = [1, 2, 3, 5, 8, 13];
    while at < body.len() {
        let piece = &body.as_bytes()[at..(at + sizes[step % sizes.len()]).min(body.len())];
        let framed = if chunked {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            framed
        } else {
            piece.to_vec()
        };
        if stream.write_all(&framed).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        at += piece.len();
        step += 1;
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    let _ = stream.shutdown().await;
}

/// A raw h1 upstream (TLS when `tls` is given) answering in pieces; the
/// request heads it received are kept.
async fn piecewise_upstream(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let kept = heads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tls, heads) = (tls.clone(), heads.clone());
            tokio::spawn(async move {
                match tls {
                    Some(cfg) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await {
                            answer_in_pieces(s, heads).await;
                        }
                    }
                    None => answer_in_pieces(stream, heads).await,
                }
            });
        }
    });
    (addr, kept)
}

async fn get_body(sg: &Sealgate, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = Request::get(format!("/echo{path}")).header("host", "sealgate");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = send(sg.proxy, req.body(empty()).unwrap()).await;
    let status = resp.status().as_u16();
    (status, body_bytes(resp).await.to_vec())
}

/// h1, plain and over TLS, framed by length and chunked: every piece
/// boundary falls inside some form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_echoing_the_token_in_pieces_is_scrubbed_over_h1_plain_and_tls() {
    let ca = TestCa::new("echo CA");
    let mut h1_only = (*ca.server_config(&["localhost"])).clone();
    h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    let segments = echoed_body(TOKEN);
    let mut expected_scrubs = 0.0;
    for tls in [false, true] {
        let (addr, heads) = piecewise_upstream(tls.then(|| Arc::new(h1_only.clone()))).await;
        let sg = if tls {
            let url = format!("https://localhost:{}", addr.port());
            Sealgate::with_bearer(TOKEN, &url, Some(&ca), "", "trace")
        } else {
            Sealgate::with_bearer(TOKEN, &format!("http://{addr}"), None, "", "trace")
        };
        expected_scrubs = 0.0;
        for path in ["/length", "/chunked"] {
            let ranged = [("accept-encoding", "gzip, br"), ("range", "bytes=0-9")];
            let (status, body) = get_body(&sg, path, &ranged).await;
            assert_eq!(status, 200, "{}", sg.stderr());
            assert_scrubbed(&body, &segments);
            expected_scrubs += form_count(&segments);
            assert_eq!(
                scrubbed(&sg, "body"),
                Some(expected_scrubs),
                "tls {tls} {path}"
            );
        }
        for head in heads.lock().unwrap().iter() {
            let head = head.to_lowercase();
            assert!(head.contains("accept-encoding: identity\r\n"), "{head}");
            assert!(!head.contains("range:"), "{head}");
        }
        let forms = secret_forms(TOKEN, &[&format!("Bearer {TOKEN}")]);
        assert_no_secret("stderr", sg.stderr().as_bytes(), &forms);
        assert_no_secret("metrics", sg.metrics().as_bytes(), &forms);
    }
    assert!(expected_scrubs > 0.0);
}

/// The same body over h2, one DATA frame per piece; with trailers, the
/// body's last bytes (which begin like the token) still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_echoing_the_token_in_h2_data_frames_is_scrubbed() {
    let ca = TestCa::new("echo CA");
    let up = upstream(
        handler(|req: hyper::Request<hyper::body::Incoming>| async move {
            assert_eq!(req.version(), hyper::Version::HTTP_2);
            let token = bearer_of(&req);
            let mut body: String = echoed_body(&token).into_iter().map(|(s, _)| s).collect();
            let with_trailers = req.uri().path() == "/trailers";
            if with_trailers {
                body.push_str(&token[..5]);
            }
            let mut frames: Vec<Result<Frame<bytes::Bytes>, std::io::Error>> = body
                .as_bytes()
                .chunks(7)
                .map(|piece| Ok(Frame::data(bytes::Bytes::copy_from_slice(piece))))
                .collect();
            if with_trailers {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("x-done", "1".parse().unwrap());
                frames.push(Ok(Frame::trailers(trailers)));
            }
            let stream = tokio_stream::iter(frames).throttle(Duration::from_millis(1));
            hyper::Response::builder()
                .body(StreamBody::new(stream).boxed())
                .expect("response")
        }),
        Some(ca.server_config(&["localhost"])),
    )
    .await;
    let url = format!("https://localhost:{}", up.addr.port());
    let sg = Sealgate::with_bearer(TOKEN, &url, Some(&ca), "", "info");
    let segments = echoed_body(TOKEN);
    let (status, body) = get_body(&sg, "/plain", &[]).await;
    assert_eq!(status, 200, "{}", sg.stderr());
    assert_scrubbed(&body, &segments);

    let (status, body) = get_body(&sg, "/trailers", &[("te", "trailers")]).await;
    assert_eq!(status, 200);
    let mut with_tail = segments.clone();
    with_tail.push((TOKEN[..5].to_string(), false));
    assert_scrubbed(&body, &with_tail);
    assert_eq!(scrubbed(&sg, "body"), Some(2.0 * form_count(&segments)));
}

/// With `scrub_responses = false` the body passes as sent (what the tests
/// above would see without scrubbing); a body in an encoding sealgate
/// cannot read is refused; a data source without a credential does not
/// scrub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrubbing_can_be_turned_off_and_an_unreadable_body_is_refused() {
    let (addr, heads) = piecewise_upstream(None).await;
    let url = format!("http://{addr}");
    let sg = Sealgate::with_bearer(TOKEN, &url, None, "scrub_responses = false\n", "info");
    let (status, body) = get_body(&sg, "/length", &[("accept-encoding", "br")]).await;
    assert_eq!(status, 200);
    let sent: String = echoed_body(TOKEN).into_iter().map(|(s, _)| s).collect();
    assert_eq!(body, sent.as_bytes());
    assert!(heads.lock().unwrap()[0].contains("accept-encoding: br"));
    assert_eq!(scrubbed(&sg, "body"), None);

    let gzipped = upstream(
        handler(|_req| async move {
            hyper::Response::builder()
                .header("content-encoding", "identity, gzip")
                .body(full(&b"\x1f\x8b compressed"[..]))
                .unwrap()
        }),
        None,
    )
    .await;
    let url = format!("http://{}", gzipped.addr);
    let sg = Sealgate::with_bearer(TOKEN, &url, None, "", "info");
    let resp = get(sg.proxy, "/echo/x").await;
    let err = assert_error(resp, 502, "unscrubbable_response").await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("scrub_responses = false"),
        "{err}"
    );
    let audit = sg.audit(1);
    assert_eq!(audit[0]["error"], "unscrubbable_response", "{audit:?}");

    let sg = Sealgate::start(&format!(
        "[datasources.echo]\nurl = \"http://{}\"\n",
        gzipped.addr
    ));
    let resp = get(sg.proxy, "/echo/x").await;
    assert_eq!(resp.status(), 200);
}

/// A 64 MiB body with the token split across every 1 MiB piece streams
/// through in flat memory, every occurrence masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_scrubbed_as_it_streams() {
    const PIECES: usize = 64;
    const PIECE: usize = 1024 * 1024;
    let up = upstream(
        handler(|req: hyper::Request<hyper::body::Incoming>| async move {
            let token = bearer_of(&req);
            let pieces = (0..PIECES).map(move |i| {
                let mut piece = vec![b'a' + (i % 26) as u8; PIECE];
                let token = token.as_bytes();
                // The token's first half ends this piece, its second half
                // begins the next.
                if i + 1 < PIECES {
                    piece[PIECE - token.len() / 2..].copy_from_slice(&token[..token.len() / 2]);
                }
                if i > 0 {
                    let rest = token.len() - token.len() / 2;
                    piece[..rest].copy_from_slice(&token[token.len() / 2..]);
                }
                Ok::<_, std::io::Error>(Frame::data(bytes::Bytes::from(piece)))
            });
            hyper::Response::builder()
                .header("content-length", PIECES * PIECE)
                .body(StreamBody::new(tokio_stream::iter(pieces)).boxed())
                .unwrap()
        }),
        None,
    )
    .await;
    let sg = Sealgate::with_bearer(TOKEN, &format!("http://{}", up.addr), None, "", "info");
    let before = sg.peak_rss_kib();
    let resp = send(
        sg.proxy,
        Request::get("/echo/big")
            .header("host", "sealgate")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut total, mut masks, mut tail) = (0usize, 0usize, Vec::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        total += data.len();
        tail.extend_from_slice(&data);
        let text = String::from_utf8_lossy(&tail);
        assert!(!text.contains(TOKEN), "the token came through");
        masks += text.matches(&"*".repeat(TOKEN.len())).count();
        let keep = tail.len().min(TOKEN.len() - 1);
        tail.drain(..tail.len() - keep);
    }
    assert_eq!(total, PIECES * PIECE);
    assert_eq!(masks, PIECES - 1);
    assert_eq!(scrubbed(&sg, "body"), Some((PIECES - 1) as f64));
    let growth = sg.peak_rss_kib().saturating_sub(before);
    assert!(growth < 16 * 1024, "peak RSS grew {growth} KiB");
}
