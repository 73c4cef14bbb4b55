//! The soak (issue 23): one sealgate under a mixed load for minutes while
//! faults arrive on a schedule, then the books are balanced.
//!
//! Load: HTTP/1.1 callers in plain text and over TLS and an HTTP/2 caller,
//! against a plain data source, a verified-TLS one, one behind a link that
//! delays every piece of its answers, an OAuth2 one whose tokens live 20 s
//! (so sealgate refreshes them all along), and a name that is no data
//! source; PostgreSQL sessions running queries, COPY both ways and
//! cancels; MySQL sessions running plain and prepared statements.
//!
//! Faults, every 30 s in turn: a SIGHUP reload, every other one with a
//! broken config (refused, nothing changes) and every other one after the
//! audit file was moved away as logrotate does; ten seconds after each, a
//! restart of the plain HTTP upstream or of PostgreSQL; ten seconds after
//! that, the delayed link 20 times slower for 4 s.
//!
//! Passes when every error a client saw happened while an injected fault
//! could explain it; the audit trail holds exactly one record per HTTP
//! request and per database session the clients made; resident memory and
//! open descriptors after the warm-up stay flat; every ERROR line sealgate
//! logged was written during a fault.
//!
//! Minutes long, so ignored by `cargo test`: `benches/soak.sh` runs it
//! (30 minutes by default), CI for 3 (`SEALGATE_SOAK_SECS=180`). sealgate
//! runs one thread, as a sidecar with one core does, unless
//! `SEALGATE_SOAK_THREADS` says more.

mod common;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mysql::{MariaServer, NATIVE_USER};
use common::postgres::{PgServer, SCRAM_USER};
use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mysql_async::prelude::Queryable;

const BEARER: &str = "soak-bearer-5d0a8e";
const API_KEY: &str = "soak-api-key-c41f27";
const CLIENT_SECRET: &str = "soak-client-secret-90be";
const TOKEN_LIFE_S: u64 = 20;
/// Every piece of the delayed data source's answers waits this long...
const LINK_DELAY_MS: u64 = 20;
/// ...and this long while a network-delay fault lasts.
const FAULT_DELAY_MS: u64 = 400;
const FAULT_DELAY_FOR: Duration = Duration::from_secs(4);
const FAULT_PERIOD: Duration = Duration::from_secs(30);
/// How long after a fault ends its effects may still be seen: a session
/// that was mid-login, a pooled connection found closed.
const AFTERMATH: Duration = Duration::from_secs(5);
/// How often memory and descriptors are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// What a caller asks for, what it must get back, and which data source
/// (and so which fault) it depends on.
struct Ask {
    datasource: &'static str,
    method: &'static str,
    path: &'static str,
    status: u16,
    len: Option<usize>,
}

const UPLOAD_LEN: usize = 16 * 1024;

const MIX: &[Ask] = &[
    Ask::get("plain", "/plain/1k", 1024),
    Ask::get("plain", "/plain/64k", 64 * 1024),
    Ask {
        datasource: "plain",
        method: "POST",
        path: "/plain/upload",
        status: 200,
        // The upstream answers with the length it received: "16384".
        len: Some(5),
    },
    Ask::get("secure", "/secure/1k", 1024),
    Ask::get("delayed", "/delayed/64k", 64 * 1024),
    Ask::get("crm", "/crm/1k", 1024),
    Ask {
        datasource: "nowhere",
        method: "GET",
        path: "/nowhere/x",
        status: 404,
        len: None,
    },
];

impl Ask {
    const fn get(datasource: &'static str, path: &'static str, len: usize) -> Ask {
        Ask {
            datasource,
            method: "GET",
            path,
            status: 200,
            len: Some(len),
        }
    }

    /// The request, over HTTP/1.1 with a `Host` header, over HTTP/2 with
    /// the authority in the URI (`https://localhost:PORT`), and only there:
    /// a `Host` that disagrees with `:authority` is a malformed request.
    fn request(&self, authority: Option<&str>) -> Request<BoxBody> {
        let body = if self.method == "POST" {
            full(vec![b'u'; UPLOAD_LEN])
        } else {
            empty()
        };
        let builder = Request::builder().method(self.method);
        let builder = match authority {
            Some(authority) => builder.uri(format!("{authority}{}", self.path)),
            None => builder.uri(self.path).header("host", "localhost"),
        };
        builder.body(body).expect("request")
    }
}

/// A client-visible failure: when, on what, and what it was.
#[derive(Debug)]
struct Failure {
    at: Instant,
    datasource: &'static str,
    what: String,
}

/// What the clients did, counted on their side.
#[derive(Default)]
struct Tally {
    http_requests: AtomicUsize,
    db_sessions: AtomicUsize,
    cancels: AtomicUsize,
    failures: Mutex<Vec<Failure>>,
}

impl Tally {
    fn fail(&self, datasource: &'static str, what: impl std::fmt::Display) {
        self.failures.lock().expect("tally").push(Failure {
            at: Instant::now(),
            datasource,
            what: what.to_string(),
        });
    }
}

/// One injected fault: which data sources it may disturb, when, and the
/// part of sealgate's log written meanwhile.
#[derive(Debug)]
struct Window {
    fault: String,
    affects: &'static [&'static str],
    during: Range<Instant>,
    log: Range<u64>,
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("stderr")).map_or(0, |m| m.len())
}

// ----------------------------------------------------------- upstreams --

/// An upstream on a fixed port that can be stopped and started again.
struct Restartable {
    listen: SocketAddr,
    handler: Handler,
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl Restartable {
    async fn start(handler: Handler) -> Restartable {
        let mut up = Restartable {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            handler,
            serving: None,
        };
        up.serve().await;
        up
    }

    async fn serve(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .expect("bind the restartable upstream");
        let accepted = Arc::new(AtomicUsize::new(0));
        self.serving = Some(tokio::spawn(serve_upstream(
            listener,
            self.handler.clone(),
            None,
            accepted,
        )));
    }

    /// Down for `down`, every open connection closed, then up again.
    async fn restart(&mut self, down: Duration) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            let _ = serving.await;
        }
        tokio::time::sleep(down).await;
        self.serve().await;
    }
}

/// A link to `target` that holds every piece of the answer for
/// `delay_ms`: a slow network path to one upstream, slower while a fault
/// says so.
async fn delaying_link(target: SocketAddr, delay_ms: Arc<AtomicU64>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the link");
    let addr = listener.local_addr().expect("link addr");
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let delay_ms = delay_ms.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
                    let _ = out_write.shutdown().await;
                });
                let mut piece = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = out_read.read(&mut piece).await {
                    let delay = delay_ms.load(Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if in_write.write_all(&piece[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = in_write.shutdown().await;
                requests.abort();
            });
        }
    });
    addr
}

/// A client-credentials token endpoint (form body, secret in the body)
/// issuing tokens that live `TOKEN_LIFE_S`, and the set of tokens still
/// valid that the resource server accepts.
#[derive(Default)]
struct Issuer {
    issued: AtomicU64,
    valid: Mutex<Vec<(String, Instant)>>,
}

impl Issuer {
    fn accepts(&self, bearer: &str) -> bool {
        let now = Instant::now();
        let token = bearer.strip_prefix("Bearer ").unwrap_or_default();
        self.valid
            .lock()
            .expect("tokens")
            .iter()
            .any(|(t, until)| t == token && *until > now)
    }

    fn handler(self: Arc<Self>) -> Handler {
        handler(move |req: Request<hyper::body::Incoming>| {
            let issuer = self.clone();
            async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let form: Vec<(String, String)> = body
                    .map(|b| url::form_urlencoded::parse(&b).into_owned().collect())
                    .unwrap_or_default();
                let secret_ok = form
                    .iter()
                    .any(|(k, v)| k == "client_secret" && v == CLIENT_SECRET);
                if !secret_ok {
                    let mut refused = Response::new(full("{\"error\":\"invalid_client\"}"));
                    *refused.status_mut() = StatusCode::UNAUTHORIZED;
                    return refused;
                }
                let n = issuer.issued.fetch_add(1, Ordering::SeqCst);
                let token = format!("soak-token-{n}");
                let until = Instant::now() + Duration::from_secs(TOKEN_LIFE_S);
                let mut valid = issuer.valid.lock().expect("tokens");
                valid.retain(|(_, u)| *u > Instant::now());
                valid.push((token.clone(), until));
                let answer = serde_json::json!({
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": TOKEN_LIFE_S,
                });
                let mut resp = Response::new(full(answer.to_string()));
                resp.headers_mut().insert(
                    "content-type",
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                resp
            }
        })
    }
}

// ---------------------------------------------------------------- callers --

#[derive(Clone, Copy, Debug)]
enum Front {
    Plain,
    Tls,
    H2,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<BoxBody>),
    H2(hyper::client::conn::http2::SendRequest<BoxBody>),
}

/// Where callers connect, and what they trust.
struct Fronts {
    plain: SocketAddr,
    tls: SocketAddr,
    ca: TestCa,
}

async fn connect(fronts: &Fronts, front: Front) -> std::io::Result<Sender> {
    match front {
        Front::Plain => {
            let stream = tokio::net::TcpStream::connect(fronts.plain).await?;
            Ok(Sender::H1(h1_over(stream).await))
        }
        Front::Tls => {
            let stream = tls_connect(fronts.tls, &[&fronts.ca], None, &[b"http/1.1"]).await?;
            Ok(Sender::H1(h1_over(stream).await))
        }
        Front::H2 => {
            let stream = tls_connect(fronts.tls, &[&fronts.ca], None, &[b"h2"]).await?;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        }
    }
}

impl Sender {
    /// Ready for another request; false when the connection has closed
    /// (no request is lost to that: none was sent on it).
    async fn ready(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }

    async fn send(
        &mut self,
        req: Request<BoxBody>,
    ) -> hyper::Result<Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// One caller connection at a time, through the mix over and over until
/// `until`, reconnecting whenever sealgate closes the connection.
async fn http_caller(fronts: Arc<Fronts>, front: Front, tally: Arc<Tally>, until: Instant) {
    let authority = match front {
        Front::Plain | Front::Tls => None,
        Front::H2 => Some(format!("https://localhost:{}", fronts.tls.port())),
    };
    let mut sender = None;
    let mut turn = 0usize;
    while Instant::now() < until {
        let mut current = match sender.take() {
            Some(s) => s,
            None => match connect(&fronts, front).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail("sealgate", format!("{front:?} connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !current.ready().await {
            continue;
        }
        let ask = &MIX[turn % MIX.len()];
        turn += 1;
        tally.http_requests.fetch_add(1, Ordering::SeqCst);
        let resp = match current.send(ask.request(authority.as_deref())).await {
            Ok(resp) => resp,
            Err(e) => {
                tally.fail(ask.datasource, format!("{front:?} {}: {e}", ask.path));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let closes = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        match body {
            Ok(body) if status == ask.status && ask.len.is_none_or(|l| l == body.len()) => {}
            Ok(body) => tally.fail(
                ask.datasource,
                format!(
                    "{front:?} {}: {status}, {} bytes: {}",
                    ask.path,
                    body.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            ),
            Err(e) => {
                tally.fail(ask.datasource, format!("{front:?} {} body: {e}", ask.path));
                continue;
            }
        }
        if !closes {
            sender = Some(current);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// PostgreSQL sessions one after another until `until`: statements with
/// parameters, COPY in and out, and every fourth session a cancelled
/// `pg_sleep`.
async fn pg_sessions(listen: SocketAddr, tally: Arc<Tally>, until: Instant, worker: u32) {
    let params = format!(
        "host=127.0.0.1 port={} dbname=orders user=app",
        listen.port()
    );
    let mut session = 0u32;
    while Instant::now() < until {
        session += 1;
        tally.db_sessions.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = pg_session(&params, &tally, worker, session).await {
            tally.fail(
                "orders",
                format!("postgres session {worker}/{session}: {e:?}"),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn pg_session(
    params: &str,
    tally: &Tally,
    worker: u32,
    session: u32,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let (client, connection) = tokio_postgres::connect(params, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    for n in 0..20i32 {
        let row = client.query_one("SELECT $1::int + 1", &[&n]).await?;
        assert_eq!(row.get::<_, i32>(0), n + 1, "the server's answer");
        client
            .execute(
                "INSERT INTO soak (worker, n, note) VALUES ($1, $2, 'it''s a note')",
                &[&(worker as i32), &n],
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sink = client
        .copy_in("COPY soak (worker, n, note) FROM STDIN")
        .await?;
    let mut sink = std::pin::pin!(sink);
    let rows: String = (0..500)
        .map(|n| format!("{worker}\t{n}\tcopied\n"))
        .collect();
    sink.send(Bytes::from(rows)).await?;
    sink.finish().await?;
    let out = client
        .copy_out("COPY (SELECT * FROM soak ORDER BY n LIMIT 2000) TO STDOUT")
        .await?;
    let copied: Vec<Bytes> = futures_util::TryStreamExt::try_collect(out).await?;
    assert!(!copied.is_empty(), "COPY out gave rows");
    client
        .execute("DELETE FROM soak WHERE worker = $1", &[&(worker as i32)])
        .await?;
    if session.is_multiple_of(4) {
        let token = client.cancel_token();
        let sleeping = client.simple_query("SELECT pg_sleep(10)");
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        };
        let (slept, cancelled) = tokio::join!(sleeping, cancel);
        cancelled?;
        match slept {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                tally.cancels.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
            Ok(_) => panic!("the cancel did not reach the server"),
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// MySQL sessions one after another until `until`: plain and prepared
/// statements.
async fn mysql_sessions(listen: SocketAddr, tally: Arc<Tally>, until: Instant, worker: u32) {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(listen.port())
        .user(Some("app"))
        .db_name(Some("crm_db"))
        .prefer_socket(false);
    let mut session = 0u32;
    while Instant::now() < until {
        session += 1;
        tally.db_sessions.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = mysql_session(opts.clone(), worker).await {
            tally.fail("crm_db", format!("mysql session {worker}/{session}: {e}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn mysql_session(
    opts: mysql_async::OptsBuilder,
    worker: u32,
) -> Result<(), mysql_async::Error> {
    let mut conn = mysql_async::Conn::new(opts).await?;
    for n in 0..20u32 {
        let one: Option<u32> = conn.query_first("SELECT 1").await?;
        assert_eq!(one, Some(1), "the server's answer");
        conn.exec_drop(
            "INSERT INTO soak (worker, n, note) VALUES (?, ?, ?)",
            (worker, n, "it's a note"),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.query_drop(format!("DELETE FROM soak WHERE worker = {worker}"))
        .await?;
    conn.disconnect().await
}

// ----------------------------------------------------------------- faults --

/// Reloads, audit rotations and restarts on their schedule until `until`,
/// each recorded as a window.
async fn inject_faults(
    sg: Arc<Sealgate>,
    mut plain: Restartable,
    pg: Arc<PgServer>,
    link_delay_ms: Arc<AtomicU64>,
    until: Instant,
) -> Vec<Window> {
    let mut windows = Vec::new();
    let config = sg.dir.path().join("sealgate.toml");
    let mut cycle = 0u32;
    let start = Instant::now();
    loop {
        cycle += 1;
        let reload_at = start + FAULT_PERIOD * cycle;
        if reload_at + FAULT_PERIOD > until {
            break;
        }
        tokio::time::sleep_until(reload_at.into()).await;
        let (from, log_from) = (Instant::now(), log_len(sg.dir.path()));
        let fault = if cycle % 2 == 1 {
            let text = std::fs::read_to_string(&config).expect("config");
            std::fs::write(&config, format!("{text}\n[datasources.broken\n")).expect("break");
            // Odd cycles' reloads fail, even ones succeed: after this one,
            // cycle / 2 rounded up have failed, cycle / 2 succeeded.
            let sg = sg.clone();
            tokio::task::spawn_blocking(move || reload_and_wait(&sg, "error", cycle.div_ceil(2)))
                .await
                .expect("reload");
            std::fs::write(&config, text).expect("mend");
            format!("reload {cycle}, broken config")
        } else {
            let audit = sg.dir.path().join("audit.log");
            std::fs::rename(&audit, sg.dir.path().join(format!("audit.log.{cycle}")))
                .expect("rotate the audit file");
            let sg = sg.clone();
            tokio::task::spawn_blocking(move || reload_and_wait(&sg, "ok", cycle / 2))
                .await
                .expect("reload");
            format!("reload {cycle}, audit rotated")
        };
        windows.push(settle(&sg, fault, &[], from, log_from).await);

        tokio::time::sleep_until((reload_at + FAULT_PERIOD / 3).into()).await;
        let (from, log_from) = (Instant::now(), log_len(sg.dir.path()));
        let (fault, affects): (String, &'static [&'static str]) = if cycle % 2 == 1 {
            plain.restart(Duration::from_secs(2)).await;
            (format!("plain upstream restarted ({cycle})"), &["plain"])
        } else {
            let pg = pg.clone();
            tokio::task::spawn_blocking(move || pg.restart())
                .await
                .expect("restart");
            (format!("PostgreSQL restarted ({cycle})"), &["orders"])
        };
        windows.push(settle(&sg, fault, affects, from, log_from).await);

        tokio::time::sleep_until((reload_at + FAULT_PERIOD * 2 / 3).into()).await;
        let (from, log_from) = (Instant::now(), log_len(sg.dir.path()));
        link_delay_ms.store(FAULT_DELAY_MS, Ordering::Relaxed);
        tokio::time::sleep(FAULT_DELAY_FOR).await;
        link_delay_ms.store(LINK_DELAY_MS, Ordering::Relaxed);
        let fault = format!("network delay on the delayed upstream ({cycle})");
        windows.push(settle(&sg, fault, &["delayed"], from, log_from).await);
    }
    windows
}

/// Closes a fault's window once its aftermath has passed.
async fn settle(
    sg: &Sealgate,
    fault: String,
    affects: &'static [&'static str],
    from: Instant,
    log_from: u64,
) -> Window {
    tokio::time::sleep(AFTERMATH).await;
    Window {
        fault,
        affects,
        during: from..Instant::now(),
        log: log_from..log_len(sg.dir.path()),
    }
}

// --------------------------------------------------------------- resources --

/// (seconds since the start, resident KiB, open descriptors).
type Sample = (f64, u64, usize);

fn sample(pid: i32, start: Instant) -> Sample {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (start.elapsed().as_secs_f64(), rss, fds)
}

fn median<T: Copy + Ord>(mut values: Vec<T>) -> T {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Medians of resident KiB and descriptors over `[from, to)` of the run.
fn medians(samples: &[Sample], from: f64, to: f64) -> (u64, usize) {
    let within: Vec<&Sample> = samples
        .iter()
        .filter(|(t, _, _)| *t >= from && *t < to)
        .collect();
    assert!(!within.is_empty(), "no samples in [{from}, {to})");
    (
        median(within.iter().map(|s| s.1).collect()),
        median(within.iter().map(|s| s.2).collect()),
    )
}

// ------------------------------------------------------------------- audit --

/// The audit files of the run: the rotated ones and the current one. A
/// 30-minute run leaves about a million lines, so they are read one file
/// at a time and only the keys counted here are parsed.
fn audit_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("sealgate's dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit.log"))
        })
        .collect();
    files.sort();
    files
}

#[derive(serde::Deserialize)]
struct Line {
    event: Option<String>,
    request_id: Option<String>,
}

/// Request records, session records and statement records, and whether
/// any request or session id appears twice.
#[derive(Default)]
struct Books {
    requests: usize,
    sessions: usize,
    statements: usize,
    repeated_ids: usize,
}

fn audit_books(files: &[std::path::PathBuf]) -> Books {
    let mut books = Books::default();
    let mut ids = std::collections::HashSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("audit file");
        for line in text.lines() {
            let line: Line = serde_json::from_str(line).expect("audit line is JSON");
            let counted = match line.event.as_deref() {
                None => &mut books.requests,
                Some("session") => &mut books.sessions,
                Some("statement") => {
                    books.statements += 1;
                    continue;
                }
                Some(_) => continue,
            };
            *counted += 1;
            if !ids.insert(line.request_id.unwrap_or_default()) {
                books.repeated_ids += 1;
            }
        }
    }
    books
}

/// Fails if any form of any secret (`secret_forms`) is in `files`, read
/// one at a time.
fn assert_secrets_absent(files: &[std::path::PathBuf], secrets: &[&str]) {
    let forms: Vec<String> = secrets.iter().flat_map(|s| secret_forms(s, &[])).collect();
    let finder = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&forms)
        .expect("a matcher of the secrets' forms");
    for file in files {
        let bytes = std::fs::read(file).expect("an output file");
        if let Some(found) = finder.find(&bytes) {
            panic!(
                "{} shows a secret as `{}`",
                file.display(),
                forms[found.pattern().as_usize()]
            );
        }
    }
}

// -------------------------------------------------------------------- run --

fn soak_duration() -> Duration {
    let secs = std::env::var("SEALGATE_SOAK_SECS").map_or(180, |s| {
        s.parse()
            .expect("SEALGATE_SOAK_SECS is a number of seconds")
    });
    Duration::from_secs(secs)
}

/// sealgate's `threads`: 1 by default, a sidecar's shape (one event loop),
/// or `SEALGATE_SOAK_THREADS` (2 or more: tokio's work-stealing runtime).
fn soak_threads() -> usize {
    std::env::var("SEALGATE_SOAK_THREADS").map_or(1, |s| {
        s.parse()
            .expect("SEALGATE_SOAK_THREADS is a number of threads")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: benches/soak.sh, and CI's 3-minute run"]
async fn a_mixed_load_under_scheduled_faults_is_answered_audited_and_leaks_nothing() {
    let run = soak_duration();
    let ca = TestCa::new("soak CA");
    let pg = Arc::new(PgServer::start(&ca, &[]));
    pg.superuser_sql(
        common::postgres::DATABASE,
        "CREATE TABLE soak (worker int, n int, note text); GRANT ALL ON soak TO PUBLIC",
    );
    let maria = MariaServer::start(&ca);
    maria.root_sql(&format!(
        "CREATE TABLE {}.soak (worker int, n int, note text)",
        common::mysql::DATABASE
    ));

    let plain = Restartable::start(content(
        |c| c == format!("Bearer {BEARER}"),
        "authorization",
    ))
    .await;
    let secure = upstream(
        content(|c| c == API_KEY, "x-api-key"),
        Some(ca.server_config(&["localhost"])),
    )
    .await;
    let delayed_origin = upstream(
        content(|c| c == format!("Bearer {BEARER}"), "authorization"),
        None,
    )
    .await;
    let link_delay_ms = Arc::new(AtomicU64::new(LINK_DELAY_MS));
    let delayed = delaying_link(delayed_origin.addr, link_delay_ms.clone()).await;
    let issuer = Arc::new(Issuer::default());
    let token_endpoint = upstream(issuer.clone().handler(), None).await;
    let resource_issuer = issuer.clone();
    let resource = upstream(
        content(move |c| resource_issuer.accepts(c), "authorization"),
        None,
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).expect("keys config");
    ca.write_pem(&dir.path().join("ca.pem"));
    let (cert, key) = ca.issue(vec![dns("localhost")]);
    std::fs::write(dir.path().join("server.pem"), cert).expect("server cert");
    std::fs::write(dir.path().join("server-key.pem"), key).expect("server key");
    let bearer = seal(&config, "plain", "token", BEARER);
    let delayed_bearer = seal(&config, "delayed", "token", BEARER);
    let api_key = seal(&config, "secure", "value", API_KEY);
    let client_secret = seal(&config, "crm", "client_secret", CLIENT_SECRET);
    let pg_password = seal(&config, "orders", "password", pg.password(SCRAM_USER));
    let maria_password = seal(&config, "crm_db", "password", maria.password(NATIVE_USER));
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let pg_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mysql_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let toml = format!(
        "{keys}\n[proxy.tls]\nlisten = [\"{tls}\"]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\
         [postgres]\nlisten = [\"{pg_listen}\"]\n\
         [mysql]\nlisten = [\"{mysql_listen}\"]\n\
         [audit]\noutput = \"audit.log\"\nstatements = \"fingerprint\"\n\
         [datasources.plain]\nurl = \"http://{plain}\"\n\
         credential = {{ kind = \"bearer\", token = \"{bearer}\" }}\n\
         [datasources.secure]\nurl = \"https://localhost:{secure}\"\nca_file = \"ca.pem\"\n\
         credential = {{ kind = \"header\", name = \"X-API-Key\", value = \"{api_key}\" }}\n\
         [datasources.delayed]\nurl = \"http://{delayed}\"\n\
         credential = {{ kind = \"bearer\", token = \"{delayed_bearer}\" }}\n\
         [datasources.crm]\nurl = \"http://{resource}\"\n\
         credential = {{ kind = \"oauth2\", token_url = \"http://{token}/token\", client_id = \"soak\", \
         client_secret = \"{client_secret}\", client_auth = \"post\" }}\n\
         [datasources.orders]\nurl = \"postgresql://localhost:{pg_port}/{pg_db}\"\nca_file = \"ca.pem\"\n\
         credential = {{ kind = \"password\", username = \"{SCRAM_USER}\", password = \"{pg_password}\" }}\n\
         [datasources.crm_db]\nurl = \"mysql://localhost:{maria_port}/{maria_db}\"\nca_file = \"ca.pem\"\n\
         credential = {{ kind = \"password\", username = \"{NATIVE_USER}\", password = \"{maria_password}\" }}\n",
        keys = keys.toml("k1"),
        plain = plain.listen,
        secure = secure.addr.port(),
        resource = resource.addr,
        token = token_endpoint.addr,
        pg_port = pg.port,
        pg_db = common::postgres::DATABASE,
        maria_port = maria.port,
        maria_db = common::mysql::DATABASE,
    );
    let threads = format!("threads = {}", soak_threads());
    let sg = Arc::new(Sealgate::start_in_with_proxy_keys(dir, &threads, &toml));
    let fronts = Arc::new(Fronts {
        plain: sg.proxy,
        tls,
        ca,
    });

    let start = Instant::now();
    let until = start + run;
    let tally = Arc::new(Tally::default());
    let mut load = tokio::task::JoinSet::new();
    for front in [Front::Plain, Front::Plain, Front::Plain, Front::Tls] {
        load.spawn(http_caller(fronts.clone(), front, tally.clone(), until));
    }
    for _ in 0..4 {
        load.spawn(http_caller(fronts.clone(), Front::H2, tally.clone(), until));
    }
    for worker in 1..=2 {
        load.spawn(pg_sessions(pg_listen, tally.clone(), until, worker));
    }
    load.spawn(mysql_sessions(mysql_listen, tally.clone(), until, 1));
    let faults = tokio::spawn(inject_faults(
        sg.clone(),
        plain,
        pg.clone(),
        link_delay_ms,
        until,
    ));
    let pid = sg.pid();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < until {
            samples.push(sample(pid, start));
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        samples
    });
    while let Some(done) = load.join_next().await {
        done.expect("a load task");
    }
    let windows = faults.await.expect("the fault injector");
    let samples = sampler.await.expect("the sampler");

    // The books: every failure a client saw falls in a fault's window.
    let failures = std::mem::take(&mut *tally.failures.lock().expect("tally"));
    let unexplained: Vec<&Failure> = failures
        .iter()
        .filter(|f| {
            !windows.iter().any(|w| {
                w.affects.contains(&f.datasource) && w.during.start <= f.at && f.at <= w.during.end
            })
        })
        .collect();

    let sg = Arc::into_inner(sg).expect("the injector let go of sealgate");
    let mut sg = sg;
    let stderr = sg.stderr();
    let mut offset = 0u64;
    let mut stray_errors = Vec::new();
    for line in stderr.split_inclusive('\n') {
        let at = offset;
        offset += line.len() as u64;
        if line.contains(" ERROR ") && !windows.iter().any(|w| w.log.contains(&at)) {
            stray_errors.push(line.trim_end().to_string());
        }
    }

    sg.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sg.wait_exit(Duration::from_secs(20));
    let files = audit_files(sg.dir.path());
    let books = audit_books(&files);

    let secs = run.as_secs_f64();
    let warm_up = (secs * 0.2).max(30.0);
    let (rss_early, fds_early) = medians(&samples, warm_up, (secs + warm_up) / 2.0);
    let (rss_late, fds_late) = medians(&samples, secs * 0.75, secs);
    let rss_peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let report = serde_json::json!({
        "seconds": secs,
        "threads": soak_threads(),
        "http_requests": tally.http_requests.load(Ordering::SeqCst),
        "http_records": books.requests,
        "db_sessions": tally.db_sessions.load(Ordering::SeqCst),
        "session_records": books.sessions,
        "statement_records": books.statements,
        "cancels": tally.cancels.load(Ordering::SeqCst),
        "tokens_issued": issuer.issued.load(Ordering::SeqCst),
        "faults": windows.len(),
        "client_failures": failures.len(),
        "unexplained_failures": unexplained.len(),
        "error_lines": stderr.lines().filter(|l| l.contains(" ERROR ")).count(),
        "stray_error_lines": stray_errors.len(),
        "rss_kib_after_warm_up": rss_early,
        "rss_kib_at_end": rss_late,
        "rss_kib_peak": rss_peak,
        "fds_after_warm_up": fds_early,
        "fds_at_end": fds_late,
        "every_10_s": samples.iter().step_by(5).map(|(t, rss, fds)| [*t as u64, *rss, *fds as u64]).collect::<Vec<_>>(),
    });
    println!("soak report: {report}");
    for w in &windows {
        let failed: Vec<&Failure> = failures
            .iter()
            .filter(|f| w.during.contains(&f.at) && w.affects.contains(&f.datasource))
            .collect();
        println!("soak fault: {} ({} client failures)", w.fault, failed.len());
        for f in failed.iter().take(3) {
            println!("  e.g. {}", f.what);
        }
    }

    assert!(
        unexplained.is_empty(),
        "client failures no fault explains: {unexplained:#?}\nfaults: {windows:#?}"
    );
    assert!(
        stray_errors.is_empty(),
        "ERROR lines outside any fault: {stray_errors:#?}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "sealgate drained and exited cleanly"
    );
    assert_eq!(books.repeated_ids, 0, "an audit record id appears twice");
    assert_eq!(
        books.requests,
        tally.http_requests.load(Ordering::SeqCst),
        "one audit record per HTTP request"
    );
    assert_eq!(
        books.sessions,
        tally.db_sessions.load(Ordering::SeqCst),
        "one audit record per database session"
    );
    assert!(
        rss_late <= rss_early + 4096,
        "resident memory grew after the warm-up: {rss_early} -> {rss_late} KiB"
    );
    assert!(
        fds_late <= fds_early + 8,
        "open descriptors grew after the warm-up: {fds_early} -> {fds_late}"
    );
    assert!(
        issuer.issued.load(Ordering::SeqCst) as f64 >= secs / TOKEN_LIFE_S as f64,
        "sealgate refreshed its OAuth2 token all along"
    );
    let mut outputs = files;
    outputs.extend(["stderr", "stdout"].map(|f| sg.dir.path().join(f)));
    assert_secrets_absent(
        &outputs,
        &[
            BEARER,
            API_KEY,
            CLIENT_SECRET,
            pg.password(SCRAM_USER),
            maria.password(NATIVE_USER),
        ],
    );
}
