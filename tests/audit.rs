//! An audit output that cannot keep up: by default requests wait, so no
//! record is ever lost; with `on_full = "drop"` they go on and every lost
//! record is counted. The output here is a FIFO that nobody reads.

mod common;

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use hyper::Request;

const CONNECTIONS: usize = 8;
/// Enough records to fill the pipe, the writer's buffer and the queue.
const REQUESTS_EACH: usize = 800;

/// A FIFO as the audit output, with a reader that never reads (opening it
/// for writing would otherwise block sealgate's start).
fn stalled_fifo(dir: &Path) -> File {
    let fifo = dir.join("audit.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&fifo)
        .unwrap()
}

/// Many requests over a few keep-alive connections; true if all finished
/// with 200 within `limit`.
async fn flood(sg: &Sealgate, limit: Duration) -> bool {
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let proxy = sg.proxy;
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
                let mut sender = h1_over(stream).await;
                for _ in 0..REQUESTS_EACH {
                    let req = Request::get("/echo/x")
                        .header("host", "x")
                        .body(empty())
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    body_bytes(resp).await;
                }
            })
        })
        .collect();
    tokio::time::timeout(limit, futures_join_all(tasks))
        .await
        .is_ok()
}

async fn futures_join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

fn start(dir: tempfile::TempDir, on_full: &str, upstream: std::net::SocketAddr) -> Sealgate {
    Sealgate::start_in(
        dir,
        &format!(
            "[audit]\noutput = \"audit.fifo\"\non_full = \"{on_full}\"\n\
             [datasources.echo]\nurl = \"http://{upstream}\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn on_full_drop_keeps_serving_and_counts_every_lost_record() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let _reader = stalled_fifo(dir.path());
    let sg = start(dir, "drop", up.addr);
    assert!(
        flood(&sg, Duration::from_secs(60)).await,
        "requests must not wait for the audit output"
    );
    let dropped = sample_value(&sg.metrics(), "sealgate_audit_dropped_total").unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "the stalled output must have cost records, and they are counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_requests_wait_for_the_audit_output() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut reader = stalled_fifo(dir.path());
    let sg = start(dir, "block", up.addr);
    let flood_done = flood(&sg, Duration::from_secs(3)).await;
    assert!(
        !flood_done,
        "with the output stalled, requests must wait rather than lose records"
    );

    // Read the output: the waiting requests are released and nothing was lost.
    let expected = 2 * CONNECTIONS * REQUESTS_EACH;
    let drained = std::thread::spawn(move || {
        use std::io::Read;
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        let requests = |text: &[u8]| {
            text.split(|&b| b == b'\n')
                .filter(|line| {
                    line.starts_with(b"{\"ts\"") && !line.windows(8).any(|w| w == b"\"event\":")
                })
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Both floods' records: the first flood's requests were waiting, not gone.
        while requests(&text) < expected && std::time::Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(n) if n > 0 => text.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        requests(&text)
    });
    assert!(
        flood(&sg, Duration::from_secs(25)).await,
        "released once the output is read"
    );
    sg.assert_metrics(&["sealgate_audit_dropped_total 0"]);
    assert_eq!(
        drained.join().unwrap(),
        expected,
        "every record was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_audit_field_is_right_for_allowed_and_refused_requests() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    write_loopback_policy(dir.path());
    let token_hash = sha256_hex("tok-app");
    std::fs::write(
        dir.path().join("policies/callers.toml"),
        format!("[callers.app]\ntoken_sha256 = \"{token_hash}\"\ndatasources = [\"pay\", \"outside\"]\n"),
    )
    .unwrap();
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[policy]\ndir = \"policies\"\n[regions.us]\negress_ips = [\"127.0.0.2\"]\n\
             [datasources.pay]\nurl = \"http://{}\"\nregion = \"us\"\n\
             [datasources.outside]\nurl = \"https://not-allowed.example.net\"\n",
            up.addr
        ),
    );
    let request = |method: &str, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x")
            .header("proxy-authorization", "Bearer tok-app")
            .body(full(body))
            .unwrap()
    };
    let id_and_length = |resp: hyper::Response<hyper::body::Incoming>| async move {
        let id = resp.headers()["x-sealgate-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        (id, body_bytes(resp).await.len() as u64)
    };
    let (allowed_id, allowed_len) =
        id_and_length(send(sg.proxy, request("POST", "/pay/x?secret=q", "hello")).await).await;
    let (denied_id, denied_len) =
        id_and_length(send(sg.proxy, request("GET", "/outside/y", "")).await).await;

    let records = sg.audit(2);
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r["request_id"] == id)
            .cloned()
            .expect("record")
    };
    let a = by_id(&allowed_id);
    let ts = a["ts"].as_str().unwrap();
    assert!(
        ts.len() >= 20 && ts.contains('T') && ts.ends_with('Z'),
        "RFC 3339: {ts}"
    );
    assert_eq!(a["caller"], "app");
    assert_eq!(a["datasource"], "pay");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/pay/x", "never the query string");
    assert_eq!(a["upstream"], up.addr.to_string());
    assert_eq!(a["egress_ip"], "127.0.0.2");
    assert_eq!(a["region"], "us");
    assert_eq!(a["decision"], "allow");
    assert!(
        a["reason"].as_str().unwrap().starts_with("allowed by "),
        "{a}"
    );
    assert_eq!(a["status"], 200);
    assert_eq!(a["request_bytes"], 5);
    assert_eq!(a["response_bytes"], allowed_len);
    assert!(a["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(a["error"].is_null());

    let d = by_id(&denied_id);
    assert_eq!(d["caller"], "app");
    assert_eq!(d["datasource"], "outside");
    assert_eq!(d["method"], "GET");
    assert_eq!(d["path"], "/outside/y");
    assert!(
        d["upstream"].is_null() && d["egress_ip"].is_null() && d["region"].is_null(),
        "{d}"
    );
    assert_eq!(d["decision"], "deny");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("matches no [egress] allow entry"),
        "{d}"
    );
    assert_eq!(d["status"], 403);
    assert_eq!(d["request_bytes"], 0);
    assert_eq!(d["response_bytes"], denied_len);
    assert_eq!(d["error"], "egress_denied");
    let all = std::fs::read_to_string(sg.dir.path().join("audit.log")).unwrap();
    assert!(
        !all.contains("tok-app") && !all.contains("secret=q"),
        "no token or query string in the trail"
    );
}

// ------------------------------------------------- a failing audit output --

/// A tmpfs of `size` mounted at `path` for one test: a disk that fills up.
/// Mounting needs root (CI runs as root) or CAP_SYS_ADMIN.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs for the full-disk test needs root or CAP_SYS_ADMIN"
        );
        Tmpfs(path.to_path_buf())
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = File::create(self.0.join("filler")).unwrap();
        let chunk = [0u8; 4096];
        while filler.write_all(&chunk).is_ok() {}
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `n` requests at once, each on its own connection; the handles finish
/// as their answers arrive.
fn burst(sg: &Sealgate, n: usize) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let proxy = sg.proxy;
            tokio::spawn(async move { get(proxy, "/echo/x").await.status().as_u16() })
        })
        .collect()
}

fn readyz(sg: &Sealgate) -> u16 {
    http_get_blocking(sg.admin, "/readyz").map_or(0, |(code, _)| code)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of the trail is whole JSON; returns the request records.
/// While the disk is full the writer retries, and each retry's write is
/// cut short and then cut back: a read between the two sees a partial
/// line for a moment. What must never be is one that stays.
fn whole_lines(path: &Path) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let text = loop {
        let text = std::fs::read_to_string(path).unwrap();
        if text.is_empty() || text.ends_with('\n') || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(text.is_empty() || text.ends_with('\n'), "a line was cut");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a whole JSON line"))
        .filter(|r| r.get("event").is_none())
        .collect()
}

/// sealgate writing its trail to a 64 KiB tmpfs, which is then filled up
/// and written to until the output fails. More records than the trail's
/// last page holds: the write that fills it is cut short and must be taken
/// back to its last whole line.
async fn on_a_disk_gone_full(on_full: &str) -> (Sealgate, Tmpfs, std::path::PathBuf, Upstream) {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "64k");
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[audit]\noutput = \"disk/audit.log\"\non_full = \"{on_full}\"\n\
             [datasources.echo]\nurl = \"http://{}\"\n",
            up.addr
        ),
    );
    let trail = sg.dir.path().join("disk/audit.log");
    wait_for("the start event is written", Duration::from_secs(5), || {
        std::fs::metadata(&trail).is_ok_and(|m| m.len() > 0)
    });
    disk.fill();
    for handle in burst(&sg, 30) {
        assert_eq!(handle.await.unwrap(), 200);
    }
    wait_for("/readyz says 503", Duration::from_secs(5), || {
        readyz(&sg) == 503
    });
    (sg, disk, trail, up)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_makes_requests_wait_and_cuts_no_line() {
    let (sg, disk, trail, _up) = on_a_disk_gone_full("block").await;
    let written_while_full = whole_lines(&trail).len();
    assert!(written_while_full < 30, "the disk was full");
    let waiting = burst(&sg, 10);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        waiting.iter().all(|h| !h.is_finished()),
        "new requests wait while no record can be written"
    );
    disk.free();
    for handle in waiting {
        assert_eq!(handle.await.unwrap(), 200);
    }
    wait_for("every record written", Duration::from_secs(5), || {
        whole_lines(&trail).len() == 40
    });
    assert_eq!(readyz(&sg), 200);
    sg.assert_metrics(&["sealgate_audit_dropped_total 0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_with_on_full_drop_counts_every_lost_record() {
    let (sg, disk, trail, _up) = on_a_disk_gone_full("drop").await;
    for handle in burst(&sg, 10) {
        assert_eq!(handle.await.unwrap(), 200, "requests go on");
    }
    disk.free();
    for handle in burst(&sg, 1) {
        assert_eq!(handle.await.unwrap(), 200);
    }
    wait_for("the output works again", Duration::from_secs(5), || {
        readyz(&sg) == 200
    });
    // A record is queued after its response is sent, so the last ones may
    // still be on their way when the answers are in.
    let accounted = || {
        let written = whole_lines(&trail).len() as f64;
        let dropped = sample_value(&sg.metrics(), "sealgate_audit_dropped_total").unwrap_or(0.0);
        (written, dropped)
    };
    wait_for(
        "every record written or counted",
        Duration::from_secs(5),
        || {
            let (written, dropped) = accounted();
            written + dropped >= 41.0
        },
    );
    let (written, dropped) = accounted();
    assert!(dropped > 0.0, "the full disk cost records");
    assert_eq!(
        written + dropped,
        41.0,
        "every record written or counted, once"
    );
}

#[test]
fn a_fifo_nobody_reads_fails_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    write_loopback_policy(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:{}\"]\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [audit]\noutput = \"audit.fifo\"\n[policy]\ndir = \"policies\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let mut child = spawn_sealgate(&["run", "-c", config.to_str().unwrap()], dir.path());
    let status = wait_child(&mut child, Duration::from_secs(5));
    let _ = child.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "exits 1 at once");
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(
        stderr.contains("audit.fifo") && stderr.contains("no process is reading"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_process_within_the_grace_period_though_the_audit_output_is_stuck() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let _reader = stalled_fifo(dir.path());
    let mut sg = start(dir, "block", up.addr);
    assert!(!flood(&sg, Duration::from_secs(2)).await, "stuck");
    assert_eq!(readyz(&sg), 503, "the stuck output shows in /readyz");
    let started = std::time::Instant::now();
    sg.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sg.wait_exit(Duration::from_secs(12));
    // The harness's grace period is 5 s; then one for pingora's runtimes
    // and one for the audit output.
    assert!(status.is_some(), "still running after SIGTERM");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let stderr = sg.stderr();
    assert!(stderr.contains("they are lost"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_cut_off_at_the_end_of_the_grace_period_is_recorded() {
    let reached = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = reached.clone();
    let hanging = raw_upstream(move |mut stream| {
        let seen = seen.clone();
        async move {
            read_head(&mut stream).await;
            seen.notify_one();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(stream);
        }
    })
    .await;
    let mut sg = Sealgate::start(&format!(
        "[datasources.slow]\nurl = \"http://{hanging}\"\ntimeout_ms = 60000\n"
    ));
    let proxy = sg.proxy;
    let _request = tokio::spawn(async move { get(proxy, "/slow/report").await.status() });
    reached.notified().await;
    sg.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sg.wait_exit(Duration::from_secs(12)).is_some(), "exited");
    let records = whole_lines(&sg.dir.path().join("audit.log"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["path"], "/slow/report");
    assert_eq!(records[0]["error"], "cut_by_drain", "{records:?}");
    assert_eq!(records[0]["datasource"], "slow");
}
