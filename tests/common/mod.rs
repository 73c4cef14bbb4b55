//! Test harness: runs the real `sealgate` binary against real upstream
//! servers on loopback, and talks to it over real sockets.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

/// The binary under test: the one cargo built for this run, or the one
/// `SEALGATE_TEST_BIN` names (CI runs the mixed-load test against the
/// release build this way).
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("SEALGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sealgate").into())
});

/// A loopback port nothing listens on (tcpmux): connecting is refused, and
/// unlike a port that was free a moment ago, no parallel test can take it.
pub const REFUSING_PORT: u16 = 1;

/// A loopback port free right now, and never the same one twice in a test
/// binary. The kernel hands out ports it gave before once they are let go
/// (38 repeats in 1,000 binds here), and two of sealgate's listeners on one
/// port are a config error, which the launch retry rightly does not retry.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// A running sealgate with its own temp dir, config and captured output.
pub struct Sealgate {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Sealgate {
    /// Starts sealgate with the given `[datasources.*]` (and any other) TOML
    /// appended to a config that listens on fresh loopback ports.
    pub fn start(extra_toml: &str) -> Sealgate {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra_toml)
    }

    pub fn start_in(dir: tempfile::TempDir, extra_toml: &str) -> Sealgate {
        Self::start_logging(dir, extra_toml, "info")
    }

    /// Like `start_in`, with `RUST_LOG` set to `rust_log`.
    pub fn start_logging(dir: tempfile::TempDir, extra_toml: &str, rust_log: &str) -> Sealgate {
        Self::launch(dir, "", extra_toml, rust_log)
    }

    /// sealgate with data source `echo` at `url`, `token` sealed as its
    /// bearer credential, `ca` written as its `ca_file`, `extra` added to
    /// its table, logging at `rust_log`.
    pub fn with_bearer(
        token: &str,
        url: &str,
        ca: Option<&TestCa>,
        extra: &str,
        rust_log: &str,
    ) -> Sealgate {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).expect("config");
        let sealed = seal(&config, "echo", "token", token);
        let ca_file = match ca {
            Some(ca) => {
                ca.write_pem(&dir.path().join("ca.pem"));
                "ca_file = \"ca.pem\"\n"
            }
            None => "",
        };
        Sealgate::start_logging(
            dir,
            &format!(
                "{}\n[datasources.echo]\nurl = \"{url}\"\n{ca_file}{extra}\
                 credential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n",
                keys.toml("k1")
            ),
            rust_log,
        )
    }

    /// Like `start_in`, with more keys in the `[proxy]` table.
    pub fn start_in_with_proxy_keys(
        dir: tempfile::TempDir,
        proxy_keys: &str,
        extra_toml: &str,
    ) -> Sealgate {
        Self::launch(dir, &format!("{proxy_keys}\n"), extra_toml, "info")
    }

    /// Like `start`, with more keys in the `[proxy]` table.
    pub fn start_with_proxy_keys(proxy_keys: &str, extra_toml: &str) -> Sealgate {
        Self::launch(
            tempfile::tempdir().expect("tempdir"),
            &format!("{proxy_keys}\n"),
            extra_toml,
            "info",
        )
    }

    fn launch(
        dir: tempfile::TempDir,
        proxy_keys: &str,
        extra_toml: &str,
        rust_log: &str,
    ) -> Sealgate {
        // A port found free can be taken by a parallel test before sealgate
        // binds it; sealgate then exits at once saying so, and we retry.
        let mut dir = dir;
        for _ in 0..3 {
            match Self::launch_once(dir, proxy_keys, extra_toml, rust_log) {
                Ok(sg) => return sg,
                Err(returned) => dir = returned,
            }
        }
        panic!("sealgate could not find free ports in three tries");
    }

    fn launch_once(
        dir: tempfile::TempDir,
        proxy_keys: &str,
        extra_toml: &str,
        rust_log: &str,
    ) -> Result<Sealgate, tempfile::TempDir> {
        let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let audit = if extra_toml.contains("[audit]") {
            ""
        } else {
            "[audit]\noutput = \"audit.log\"\n"
        };
        // Two threads unless the test sets its own.
        let threads = if proxy_keys.contains("threads") {
            ""
        } else {
            "threads = 2\n"
        };
        let config = format!(
            "[proxy]\nlisten = [\"{proxy}\"]\n{threads}grace_period_s = 5\n{proxy_keys}\
             [admin]\nlisten = \"{admin}\"\n{audit}\n{extra_toml}"
        );
        let config = if extra_toml.contains("[policy]") {
            config
        } else {
            write_loopback_policy(dir.path());
            format!("{config}\n[policy]\ndir = \"policies\"\n")
        };
        let config_path = dir.path().join("sealgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let child = spawn_with_log(
            &["run", "-c", config_path.to_str().unwrap_or_default()],
            dir.path(),
            rust_log,
        );
        let mut sg = Sealgate {
            child: Some(child),
            proxy,
            admin,
            dir,
        };
        if sg.wait_ready() {
            Ok(sg)
        } else {
            let placeholder = tempfile::tempdir().expect("tempdir");
            Err(std::mem::replace(&mut sg.dir, placeholder))
        }
    }

    /// True once ready; false if sealgate could not bind a port (retry).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                if self.stderr().contains("cannot listen on") {
                    return false;
                }
                panic!(
                    "sealgate exited during startup ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            if http_get_blocking(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        panic!("sealgate did not become ready; stderr:\n{}", self.stderr());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The process's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal sealgate");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(self.child.as_mut()?, timeout)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Audit records written so far (the writer flushes whenever its queue
    /// is empty, so this waits briefly for `min` records).
    pub fn audit(&self, min: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let records: Vec<serde_json::Value> = self
                .audit_trail()
                .into_iter()
                .filter(|r| r.get("event").is_none())
                .collect();
            if records.len() >= min || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The database session records (`event: "session"`), waiting briefly
    /// for `min` of them: a session's record is written as it ends.
    pub fn audit_sessions(&self, min: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let records: Vec<serde_json::Value> = self
                .audit_trail()
                .into_iter()
                .filter(|r| r["event"] == "session")
                .collect();
            if records.len() >= min || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configuration events of the audit trail (start, reload, drain).
    /// Fails if any secret, in any encoding, is in what the clients saw
    /// (`seen`), the audit file, the metrics or sealgate's output, which
    /// must have logged at trace level.
    pub fn assert_secrets_nowhere(&self, seen: &[u8], secrets: &[String]) {
        let audit = std::fs::read(self.dir.path().join("audit.log")).unwrap_or_default();
        let (metrics, stdout, stderr) = (self.metrics(), self.stdout(), self.stderr());
        for secret in secrets {
            let forms = secret_forms(secret, &[]);
            assert_no_secret("what the clients saw", seen, &forms);
            assert_no_secret("the audit trail", &audit, &forms);
            assert_no_secret("metrics", metrics.as_bytes(), &forms);
            assert_no_secret("stdout", stdout.as_bytes(), &forms);
            assert_no_secret("stderr", stderr.as_bytes(), &forms);
        }
        assert!(stderr.contains("TRACE"), "logging ran at trace level");
    }

    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        self.audit_trail()
            .into_iter()
            .filter(|r| r.get("event").is_some())
            .collect()
    }

    /// Every complete line of the audit file, read while sealgate may still
    /// be writing it. A large write reaches the page cache a page at a time,
    /// so a reader can catch the last record half-written; like a log
    /// shipper, this takes only the lines that already end in a newline.
    fn audit_trail(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        text.split_inclusive('\n')
            .filter_map(|line| line.strip_suffix('\n'))
            .map(|line| serde_json::from_str(line).expect("audit line is JSON"))
            .collect()
    }

    /// Rewrites the running instance's config file, `from` replaced by
    /// `to`, for a reload to pick up.
    pub fn edit_config(&self, from: &str, to: &str) {
        let config = self.dir.path().join("sealgate.toml");
        let text = std::fs::read_to_string(&config).expect("read config");
        assert!(text.contains(from), "{from:?} is not in the config");
        std::fs::write(&config, text.replace(from, to)).expect("write config");
    }

    pub fn metrics(&self) -> String {
        http_get_blocking(self.admin, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Asserts that one scrape of /metrics has each of these sample lines.
    pub fn assert_metrics(&self, lines: &[&str]) {
        assert_has_samples(&self.metrics(), lines);
    }
}

impl Drop for Sealgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Test upstreams live on loopback, which the built-in deny list blocks:
/// this policy lets tests reach them, as an operator would with
/// allow_private for a local service.
pub fn write_loopback_policy(dir: &Path) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("loopback.toml"),
        "[egress]\nallow = [\"127.0.0.0/8\", \"localhost\", \"[::1]\"]\n\
         allow_private = [\"127.0.0.0/8\", \"[::1]\"]\n",
    )
    .expect("policy file");
}

/// A caller token as `token_sha256` in a callers policy wants it.
/// A whole second `seconds_ahead` from now: (Unix seconds, RFC 3339 UTC
/// as `not_after` and `expires_at` take it).
pub fn utc_in(seconds_ahead: i64) -> (u64, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = (now + seconds_ahead + 1) as u64;
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{at}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    (at, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Spawns the binary with stdout/stderr captured to files in `dir`.
pub fn spawn_sealgate(args: &[&str], dir: &Path) -> Child {
    spawn_with_log(args, dir, "info")
}

/// Runs sealgate in `dir`, its output in `dir/stdout` and `dir/stderr`. A
/// test may put `NAME=VALUE` lines in `dir/env` for its environment (a
/// preloaded fake clock, say).
pub fn spawn_with_log(args: &[&str], dir: &Path, rust_log: &str) -> Child {
    let out = std::fs::File::create(dir.join("stdout")).expect("stdout file");
    let err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let env = std::fs::read_to_string(dir.join("env")).unwrap_or_default();
    let env = env.lines().filter_map(|l| l.split_once('='));
    Command::new(&*BIN)
        .args(args)
        .envs(env)
        .env("RUST_LOG", rust_log)
        .env_remove("SEALGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn sealgate")
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `sealgate check -c PATH`: exit code, stdout, stderr.
pub fn check_config(path: impl AsRef<std::path::Path>) -> (i32, String, String) {
    run_cli(&["check", "-c", &path.as_ref().to_string_lossy()], b"")
}

/// Runs a sealgate subcommand to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(&*BIN)
        .args(args)
        .env_remove("SEALGATE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sealgate");
    if let Some(mut input) = child.stdin.take() {
        use std::io::Write;
        input.write_all(stdin).expect("write stdin");
    }
    let out = child.wait_with_output().expect("sealgate output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal blocking GET for admin endpoints: (status, body).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

// ---------------------------------------------------------------- reload --

/// Sends SIGHUP and waits until the reload counter for `result` reaches `n`.
pub fn reload_and_wait(sg: &Sealgate, result: &str, n: u32) {
    sg.signal(nix::sys::signal::Signal::SIGHUP);
    let want = format!("sealgate_config_reloads_total{{result=\"{result}\"}} {n}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sg.metrics().contains(&want) {
        assert!(
            Instant::now() < deadline,
            "no `{want}`; stderr:\n{}",
            sg.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- client --

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// Sends one request over a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<BoxBody>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect to sealgate");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    sender.send_request(req).await.expect("send request")
}

pub async fn get(addr: SocketAddr, path: &str) -> Response<Incoming> {
    send(
        addr,
        Request::get(path)
            .header("host", "sealgate")
            .body(empty())
            .expect("request"),
    )
    .await
}

pub async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body()
        .collect()
        .await
        .expect("whole body")
        .to_bytes()
}

pub async fn json(resp: Response<Incoming>) -> serde_json::Value {
    serde_json::from_slice(&body_bytes(resp).await).expect("JSON body")
}

/// Asserts the response is sealgate's SPEC error with this status and code.
pub async fn assert_error(resp: Response<Incoming>, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status(), StatusCode::from_u16(status).unwrap());
    let ct = resp.headers().get("content-type").cloned();
    assert_eq!(
        ct.as_ref().and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let v = json(resp).await;
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

// ------------------------------------------------------------- upstreams --

pub type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<BoxBody>> + Send>>
        + Send
        + Sync,
>;

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// An HTTP upstream (h1, or h1/h2 by ALPN when `tls` is given).
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

pub async fn upstream(h: Handler, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(serve_upstream(listener, h, tls, accepted.clone()));
    Upstream { addr, accepted }
}

/// Serves `h` on `listener`, counting connections in `accepted`. The
/// connections belong to this future: dropping (aborting) it closes every
/// one of them, as an upstream that restarts does.
pub async fn serve_upstream(
    listener: tokio::net::TcpListener,
    h: Handler,
    tls: Option<Arc<rustls::ServerConfig>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let h = h.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let h = h.clone();
                async move { Ok::<_, std::convert::Infallible>(h(req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(cfg) => {
                    let Ok(tls_stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                    else {
                        return;
                    };
                    let _ = builder
                        .serve_connection(TokioIo::new(tls_stream), svc)
                        .await;
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
            }
        });
    }
}

/// An upstream of `/1k`, `/64k` and uploads (answered with the length
/// received) that refuses (401) a request without the credential
/// `accepts` approves in `header`.
pub fn content(
    accepts: impl Fn(&str) -> bool + Send + Sync + 'static,
    header: &'static str,
) -> Handler {
    let accepts = Arc::new(accepts);
    handler(move |req: Request<hyper::body::Incoming>| {
        let accepts = accepts.clone();
        async move {
            let credential = req.headers().get(header).and_then(|v| v.to_str().ok());
            if !credential.is_some_and(|c| accepts(c)) {
                let mut refused = Response::new(full("credential missing"));
                *refused.status_mut() = StatusCode::UNAUTHORIZED;
                return refused;
            }
            let path = req.uri().path().to_string();
            let body = if path.ends_with("/1k") {
                vec![b'k'; 1024]
            } else if path.ends_with("/64k") {
                vec![b'm'; 64 * 1024]
            } else {
                let received = req.into_body().collect().await.map(|b| b.to_bytes());
                received
                    .map(|b| b.len().to_string().into_bytes())
                    .unwrap_or_default()
            };
            Response::new(full(body))
        }
    })
}

/// An upstream that answers with what it received, as JSON.
pub async fn echo_upstream() -> Upstream {
    upstream(
        handler(|req: Request<hyper::body::Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").into()))
                .collect();
            let report = serde_json::json!({
                "method": parts.method.as_str(),
                "target": parts.uri.to_string(),
                "headers": headers,
                "body_len": body.len(),
                "body_sha256": format!("{:x}", Sha256::digest(&body)),
            });
            Response::new(full(report.to_string()))
        }),
        None,
    )
    .await
}

/// An upstream that keeps what it received (headers and target) for the
/// test to inspect, and answers a fixed body: unlike the echo upstream it
/// never sends a credential back.
pub async fn recording_upstream() -> (Upstream, Arc<Mutex<Vec<serde_json::Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = upstream(
        handler(move |req: Request<Incoming>| {
            let log = log.clone();
            async move {
                let headers: serde_json::Map<String, serde_json::Value> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").into()))
                    .collect();
                let entry =
                    serde_json::json!({ "target": req.uri().to_string(), "headers": headers });
                log.lock().expect("recording lock").push(entry);
                Response::new(full("ok"))
            }
        }),
        None,
    )
    .await;
    (up, seen)
}

/// An upstream that speaks raw bytes, for misbehaviour hyper would not allow.
pub async fn raw_upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind raw upstream");
    let addr = listener.local_addr().expect("raw upstream addr");
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(f(stream));
        }
    });
    addr
}

/// The token of a request's `Authorization: Bearer` header, as an
/// upstream received it.
pub fn bearer_of<B>(req: &Request<B>) -> String {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_start_matches("Bearer ")
        .to_string()
}

/// Reads a request head (up to the blank line) from a raw connection,
/// plain or TLS.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

// ------------------------------------------------------------------- TLS --

pub struct TestCa {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa { cert, key }
    }

    pub fn write_pem(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).expect("write CA pem");
        path.to_path_buf()
    }

    /// A rustls server config presenting a leaf for `names`, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("leaf params");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        let chain = vec![leaf.der().clone()];
        let key_der =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .expect("server cert");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

// ------------------------------------------------------------------ keys --

/// A key directory with one key, `k1`, and a salt, inside `dir`.
pub struct Keys {
    pub dir: PathBuf,
    pub salt: String,
}

impl Keys {
    pub fn new(parent: &Path) -> Keys {
        let dir = parent.join("keys");
        std::fs::create_dir_all(&dir).expect("key dir");
        let keys = Keys {
            dir,
            salt: run_cli(&["salt"], b"").1.trim().to_string(),
        };
        keys.add("k1");
        keys
    }

    pub fn add(&self, id: &str) {
        let path = self.dir.join(format!("{id}.key"));
        let (code, _, err) = run_cli(&["keygen", "--out", path.to_str().unwrap_or_default()], b"");
        assert_eq!(code, 0, "keygen: {err}");
    }

    pub fn toml(&self, primary: &str) -> String {
        format!(
            "[keys]\ndir = \"keys\"\nprimary = \"{primary}\"\nsalt = \"{}\"\n",
            self.salt
        )
    }
}

/// Seals through the CLI, plaintext on stdin, as an operator would.
pub fn seal(config: &Path, datasource: &str, field: &str, plaintext: &str) -> String {
    let cfg = config.to_str().unwrap_or_default();
    let (code, out, err) = run_cli(
        &[
            "seal",
            "-c",
            cfg,
            "--datasource",
            datasource,
            "--field",
            field,
        ],
        format!("{plaintext}\n").as_bytes(),
    );
    assert_eq!(code, 0, "seal: {err}");
    out.trim().to_string()
}

impl TestCa {
    /// A leaf certificate with these SANs, as (cert PEM, key PEM).
    pub fn issue(&self, sans: Vec<rcgen::SanType>) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf with an RSA key, the key in PKCS#1 PEM: some clients
    /// (mysql_async) read no other kind. ring cannot make RSA keys, so the
    /// `openssl` tool (from Debian's openssl, which ca-certificates needs)
    /// makes it.
    pub fn issue_rsa(&self, sans: Vec<rcgen::SanType>) -> (String, String) {
        let openssl = |args: &[&str], input: &[u8]| {
            use std::io::Write;
            let mut child = Command::new("openssl")
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("openssl");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input)
                .expect("write");
            let out = child.wait_with_output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}");
            String::from_utf8(out.stdout).expect("PEM")
        };
        let pkcs1 = openssl(&["genrsa", "-traditional", "2048"], b"");
        let pkcs8 = openssl(&["pkcs8", "-topk8", "-nocrypt"], pkcs1.as_bytes());
        let key = rcgen::KeyPair::from_pem(&pkcs8).expect("RSA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = sans;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        (cert.pem(), pkcs1)
    }
}

pub fn dns(name: &str) -> rcgen::SanType {
    rcgen::SanType::DnsName(name.try_into().expect("dns name"))
}

pub fn uri(name: &str) -> rcgen::SanType {
    rcgen::SanType::URI(name.try_into().expect("uri"))
}

/// Connects with TLS to `addr`, trusting `server_cas`, optionally presenting
/// a client certificate, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    server_cas: &[&TestCa],
    client: Option<&(String, String)>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in server_cas {
        roots.add(ca.cert.der().clone()).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client chain");
            let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
                .expect("client key")
                .expect("a key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// One HTTP/1.1 request over an established (TLS) stream; the sender can be
/// reused for more requests on the same connection.
pub async fn h1_over<S>(stream: S) -> hyper::client::conn::http1::SendRequest<BoxBody>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    sender
}

/// Asserts that a /metrics scrape has each of these sample lines.
pub fn assert_has_samples(metrics: &str, lines: &[&str]) {
    for line in lines {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }
}

/// The value of one sample, `name` or `name{labels}`, in a /metrics scrape.
pub fn sample_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------- leaks --

/// Every form in which a client could read `secret` back: as it is, in
/// either letter case, hex, base64 (standard and URL-safe, padded or not)
/// of it and of each value that carries it, and percent-encoded (either
/// hex case, `+` for space). Compared without regard to case.
pub fn secret_forms(secret: &str, carriers: &[&str]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    let mut forms = vec![
        secret.to_string(),
        secret.bytes().map(|b| format!("{b:02x}")).collect(),
        secret.bytes().map(|b| format!("%{b:02x}")).collect(),
        secret.replace('+', "%2B").replace(' ', "+"),
    ];
    for value in std::iter::once(secret).chain(carriers.iter().copied()) {
        for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            forms.push(engine.encode(value));
        }
    }
    forms
}

/// Every byte of `s` percent-encoded, in upper- or lower-case hex.
pub fn percent(s: &str, upper: bool) -> String {
    s.bytes()
        .map(|b| {
            if upper {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            }
        })
        .collect()
}

/// Fails naming where and in which form `emitted` shows the secret.
pub fn assert_no_secret(what: &str, emitted: &[u8], forms: &[String]) {
    let text = String::from_utf8_lossy(emitted).to_lowercase();
    for form in forms {
        let form_lower = form.to_lowercase();
        if let Some(at) = text.find(&form_lower) {
            let start = text[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map_or(0, |(i, _)| i);
            let end = (at + form.len() + 100).min(text.len());
            panic!(
                "{what} shows the secret as `{form}`:\n{}",
                text.get(start..end).unwrap_or(&text)
            );
        }
    }
}

/// Sends raw bytes on a fresh connection and reads until the peer closes
/// (or 5 s pass): every byte a caller would see.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await;
    seen
}
pub mod mysql;
pub mod postgres;

/// Database servers refuse to run as root, and CI runs as root: then the
/// command runs as the system user the server's package created.
pub fn as_system_user<'a>(cmd: &'a mut Command, user: &str) -> &'a mut Command {
    use std::os::unix::process::CommandExt;
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the {user} user (created by the server's package)"));
        cmd.gid(user.gid.as_raw()).uid(user.uid.as_raw());
    }
    cmd
}

/// Gives `path` to that user when we are root.
pub fn chown_to_system_user(path: &Path, user: &str) {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the {user} user"));
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).expect("chown");
    }
}

/// 24 random letters and digits: easy to spot in any output.
pub fn random_password() -> String {
    let mut bytes = [0u8; 24];
    getrandom::getrandom(&mut bytes).expect("random");
    bytes
        .iter()
        .map(|b| {
            let chars = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
            chars[*b as usize % chars.len()] as char
        })
        .collect()
}
