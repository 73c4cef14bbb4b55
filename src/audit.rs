//! The audit trail: one JSON line per request, written by a dedicated
//! thread so request tasks never do file I/O. The queue is bounded. An
//! output that cannot keep up, or that fails (a full disk, an I/O error, a
//! FIFO nobody reads), makes new requests wait and `/readyz` say 503 until
//! writes succeed again; with `on_full = "drop"` every record lost is
//! counted instead. A record reaches the output whole or not at all.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::audit_chain::{Chain, ChainKey, GENESIS};
use crate::config::{AuditOutput, OnFull};

const QUEUE_DEPTH: usize = 4096;
/// What the writer gathers before writing: a poll interval's records.
const WRITE_BUFFER: usize = 64 * 1024;
/// How long the writer gathers records, after the first, before writing
/// them out.
const WRITE_INTERVAL: Duration = Duration::from_millis(10);
/// A write that has not returned after this long counts as a failing
/// output (a pipe or terminal nobody reads blocks rather than fails).
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// Retries of a failed write back off up to this.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a request waiting for a failing output looks again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// SPEC section 7. Every key is always present; `None` is written as null.
#[derive(Debug)]
pub struct AuditRecord<'a> {
    pub ts: SystemTime,
    /// `session` for a database session (SPEC section 9); HTTP request
    /// records carry no `event` key.
    pub event: Option<&'static str>,
    pub request_id: &'a str,
    pub caller: Option<&'a str>,
    pub datasource: Option<&'a str>,
    pub method: &'a str,
    pub path: Option<&'a str>,
    pub upstream: Option<SocketAddr>,
    pub egress_ip: Option<IpAddr>,
    pub region: Option<&'a str>,
    pub decision: Decision,
    pub reason: Option<&'a str>,
    pub status: Option<u16>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration: Duration,
    pub error: Option<&'static str>,
    /// `http`, `postgres`.
    pub protocol: &'static str,
    /// Whose credential was used: `datasource` or `caller` (SPEC section 8).
    pub credential: Option<&'static str>,
    /// The user a database client named (recorded, never trusted).
    pub client_user: Option<&'a str>,
    /// The user sealgate logged in to the database as.
    pub db_user: Option<&'a str>,
    /// Statements a database session ran.
    pub statements: Option<u64>,
    /// A statement record's own keys (`event: "statement"`).
    pub statement: Option<StatementFields<'a>>,
}

/// One statement of a database session (SPEC section 9): its literal-free
/// text, never its values or the server's error text.
#[derive(Debug)]
pub struct StatementFields<'a> {
    /// The completion tag's verb; none when the statement failed.
    pub command: Option<&'a str>,
    pub rows: Option<u64>,
    pub sqlstate: Option<&'a str>,
    pub text: &'a str,
    pub fingerprint: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// `at` in RFC 3339, UTC, to the microsecond (`2026-11-22T23:50:41.123456Z`):
/// fixed width, so the trail sorts and lines up. Written by hand because
/// every request records one; instants before 1970 are written as 1970.
/// A time as the audit trail writes it, for admin output.
pub fn rfc3339(at: SystemTime) -> String {
    let mut out = Vec::with_capacity(32);
    write_rfc3339(&mut out, at);
    String::from_utf8_lossy(&out).into_owned()
}

fn write_rfc3339(out: &mut Vec<u8>, at: SystemTime) {
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let fields = [
        (4, year),
        (7, month),
        (10, day),
        (13, of_day / 3600),
        (16, of_day / 60 % 60),
        (19, of_day % 60),
        (26, u64::from(since_epoch.subsec_micros())),
    ];
    let mut field_start = 0;
    for (field_end, value) in fields {
        let mut value = value;
        for digit in text[field_start..field_end].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
        field_start = field_end + 1;
    }
    out.extend_from_slice(&text);
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar, counting in 400-year eras that start on March 1st
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

enum Message {
    Line(Vec<u8>),
    Flush(std_mpsc::SyncSender<()>),
    /// Reopen the output file (after logrotate moved it away), chaining
    /// from then on under the key given (the reloaded primary's).
    Reopen(Option<ChainKey>),
}

/// Kinds of configuration event recorded in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Reload,
    Drain,
    /// A minted credential was fetched (or failed to be): never the token.
    CredentialRefresh,
    /// The first line of each file the chained trail is written to.
    ChainStart,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Reload => "reload",
            Event::Drain => "drain",
            Event::CredentialRefresh => "credential_refresh",
            Event::ChainStart => "chain_start",
        }
    }
}

/// The keys of a request record in the order `encode` writes them (SPEC
/// section 7); `every_request_key_in_order` holds `encode` to it. An event
/// carries them too, as null, so every line of the trail has the same keys.
const REQUEST_KEYS: [&str; 21] = [
    "ts",
    "request_id",
    "caller",
    "datasource",
    "method",
    "path",
    "upstream",
    "egress_ip",
    "region",
    "decision",
    "reason",
    "status",
    "request_bytes",
    "response_bytes",
    "duration_ms",
    "error",
    "protocol",
    "credential",
    "client_user",
    "db_user",
    "statements",
];

pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    on_full: OnFull,
    dropped: prometheus::IntCounter,
    health: Arc<Health>,
}

/// What the writer thread tells the rest of sealgate about the output.
struct Health {
    failing: AtomicBool,
    /// When the write under way started, in ms since `epoch` plus one;
    /// 0 while no write is under way.
    write_started: AtomicU64,
    epoch: Instant,
    /// Records queued and neither written nor counted as dropped. Counted
    /// up once queued, so the writer may count one down first: negative
    /// for a moment, never for long.
    unwritten: AtomicI64,
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn writable(&self) -> bool {
        let started = self.write_started.load(Ordering::Relaxed);
        !self.failing.load(Ordering::Relaxed)
            && (started == 0
                || self.now_ms().saturating_sub(started) < STUCK_AFTER.as_millis() as u64)
    }
}

impl AuditLog {
    /// Opens the output (a file is created or appended, mode 0640; a FIFO
    /// must have a reader already) and starts the writer thread.
    pub fn open(
        output: &AuditOutput,
        on_full: OnFull,
        dropped: prometheus::IntCounter,
        chain: Option<ChainKey>,
    ) -> io::Result<AuditLog> {
        let sink = open_output(output)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let health = Arc::new(Health {
            failing: AtomicBool::new(false),
            write_started: AtomicU64::new(0),
            epoch: Instant::now(),
            unwritten: AtomicI64::new(0),
        });
        // A restart continues the chain it left off.
        let chain = chain.map(|key| {
            let prev = match output {
                AuditOutput::File(path) => Chain::resume_point(path),
                AuditOutput::Stdout => GENESIS,
            };
            Chain::new(key, prev)
        });
        let chain_state = match (output, &chain) {
            (AuditOutput::File(path), Some(_)) => Some(open_chain_state(path)?),
            _ => None,
        };
        let mut writer = Writer {
            sink,
            output: output.clone(),
            batch: Vec::with_capacity(WRITE_BUFFER),
            begun: false,
            on_full,
            dropped: dropped.clone(),
            health: health.clone(),
            chain,
            written: GENESIS,
            chain_state,
        };
        writer.begin_chain();
        std::thread::Builder::new()
            .name("sealgate-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx,
            on_full,
            dropped,
            health,
        })
    }

    /// Whether the output is taking writes; `/readyz` says 503 while not.
    pub fn is_writable(&self) -> bool {
        self.health.writable()
    }

    /// Before a request is let through: while the output fails, a request
    /// waits here, so nothing reaches a data source that the trail could
    /// not record. With `on_full = "drop"` requests go on.
    pub async fn wait_writable(&self) {
        while self.on_full == OnFull::Block && !self.health.writable() {
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// Queues a record. While the writer is behind, the request waits, or
    /// with `on_full = "drop"` the record is dropped and counted.
    pub async fn record(&self, record: &AuditRecord<'_>) {
        self.record_line(encode(record)).await
    }

    /// Queues a record already encoded, as `record` does.
    pub async fn record_line(&self, line: Vec<u8>) {
        let line = Message::Line(line);
        let sent = match self.on_full {
            OnFull::Block => self.tx.send(line).await.is_ok(),
            OnFull::Drop => self.tx.try_send(line).is_ok(),
        };
        self.queued(sent);
    }

    fn queued(&self, sent: bool) {
        if sent {
            self.health.unwritten.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.inc();
        }
    }

    /// Queues a record from where waiting is impossible (a request's state
    /// being dropped); a full queue drops it, counted and logged.
    pub fn record_now(&self, record: &AuditRecord<'_>) {
        let sent = self.tx.try_send(Message::Line(encode(record))).is_ok();
        self.queued(sent);
        if !sent {
            tracing::error!(
                request_id = record.request_id,
                "the audit queue is full; the record of a request cut off was not written"
            );
        }
    }

    /// Records a configuration event. Events are rare and may come from
    /// any context, so they never wait; one that finds the queue full is
    /// logged instead, never silently lost.
    pub fn event(&self, event: Event, result: &str, message: &str, key_ids: Option<&[String]>) {
        let line = encode_event(SystemTime::now(), event, result, message, key_ids);
        let sent = self.tx.try_send(Message::Line(line)).is_ok();
        self.queued(sent);
        if !sent {
            tracing::error!(
                ?event,
                result,
                message,
                "the audit queue is full; this configuration event was not recorded"
            );
        }
    }

    /// After logrotate moved the file away: writes go to a new file, its
    /// chain (if on) under `chain_key` from its first line.
    pub fn reopen(&self, chain_key: Option<ChainKey>) {
        if self.tx.try_send(Message::Reopen(chain_key)).is_err() {
            tracing::error!("the audit queue is full; the audit output was not reopened");
        }
    }

    /// Writes out everything queued so far, for shutdown, from a plain
    /// thread; never waits past `timeout`, however stuck the output. What
    /// could not be written by then is counted as dropped and logged.
    pub fn flush_blocking(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = std_mpsc::sync_channel(1);
        let mut flush = Message::Flush(done_tx);
        let flushed = loop {
            match self.tx.try_send(flush) {
                Ok(()) => {
                    break done_rx
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .is_ok()
                }
                Err(mpsc::error::TrySendError::Full(back)) if Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break false,
            }
        };
        let unwritten = self.health.unwritten.swap(0, Ordering::Relaxed).max(0) as u64;
        if !flushed && unwritten > 0 {
            self.dropped.inc_by(unwritten);
            tracing::error!(
                records = unwritten,
                "the audit output did not take these records before exit; they are lost"
            );
        }
    }
}

/// Where records go: a file can be cut back to its last whole line after a
/// failed write; a stream (stdout, a FIFO) cannot, so the line it began is
/// finished first.
enum Sink {
    Stdout(io::Stdout),
    File(File),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stdout(out) => out.write(bytes).and_then(|n| out.flush().map(|()| n)),
            Sink::File(file) => file.write(bytes),
        }
    }

    /// Removes the last `bytes` written, if this output can.
    fn cut_back(&mut self, bytes: u64) -> bool {
        let Sink::File(file) = self else {
            return false;
        };
        match file.metadata() {
            Ok(meta) if meta.is_file() => file.set_len(meta.len().saturating_sub(bytes)).is_ok(),
            _ => false,
        }
    }
}

fn open_chain_state(output: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = crate::audit_chain::state_path(output);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("audit chain state {}: {e}", path.display()),
            )
        })
}

fn open_output(output: &AuditOutput) -> io::Result<Sink> {
    Ok(match output {
        AuditOutput::Stdout => Sink::Stdout(io::stdout()),
        AuditOutput::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Without O_NONBLOCK, opening a FIFO waits for a reader, and a
            // write to one whose reader stopped never returns.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(path)
                .map_err(|e| {
                    let why = if e.raw_os_error() == Some(nix::libc::ENXIO) {
                        "it is a FIFO that no process is reading".to_string()
                    } else {
                        e.to_string()
                    };
                    io::Error::new(e.kind(), format!("audit output {}: {why}", path.display()))
                })?;
            Sink::File(file)
        }
    })
}

struct Writer {
    sink: Sink,
    output: AuditOutput,
    /// Whole lines waiting to be written.
    batch: Vec<u8>,
    /// Whether the batch's first line is the rest of one a stream has
    /// begun: it must be finished, or the line before it is cut.
    begun: bool,
    on_full: OnFull,
    dropped: prometheus::IntCounter,
    health: Arc<Health>,
    chain: Option<Chain>,
    /// The chain value of the last line the output took whole.
    written: [u8; 64],
    /// Where `written` is kept for the next start (`audit_chain::state_path`).
    chain_state: Option<File>,
}

impl Writer {
    /// A `chain_start` line opens each file the chained trail goes to.
    fn begin_chain(&mut self) {
        if let Some(chain) = &mut self.chain {
            let mut line = encode_chain_start(SystemTime::now(), chain.key_id(), &chain.prev());
            chain.extend(&mut line);
            self.batch.extend_from_slice(&line);
            self.health.unwritten.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        // The writer gathers instead of being woken for every record: a
        // wake-up per request costs a context switch on the proxy's own
        // core, which is most of what auditing would otherwise cost. It
        // sleeps in `blocking_recv` while nothing is queued, so an idle
        // sidecar's writer never wakes; once a record arrives it waits one
        // interval for the rest, and writes them all.
        while let Some(first) = rx.blocking_recv() {
            self.handle(first);
            std::thread::sleep(WRITE_INTERVAL);
            while let Ok(message) = rx.try_recv() {
                self.handle(message);
            }
            self.write_batch();
        }
        self.write_batch();
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Line(mut line) => {
                if let Some(chain) = &mut self.chain {
                    chain.extend(&mut line);
                }
                self.batch.extend_from_slice(&line);
                if self.batch.len() >= WRITE_BUFFER {
                    self.write_batch();
                }
            }
            Message::Flush(done) => {
                self.write_batch();
                let _ = done.send(());
            }
            Message::Reopen(chain_key) => {
                self.write_batch();
                match open_output(&self.output) {
                    Ok(sink) => {
                        self.sink = sink;
                        if let (Some(chain), Some(key)) = (&mut self.chain, chain_key) {
                            chain.rekey(key);
                        }
                        self.begin_chain();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reopening the audit output failed; still writing to the old one")
                    }
                }
            }
        }
    }

    /// Writes the batch whole. On failure a file is cut back to its last
    /// whole line; then, by default, the same lines are tried again (new
    /// requests wait meanwhile), or with `on_full = "drop"` they are
    /// counted as dropped, all but a line a stream has begun.
    fn write_batch(&mut self) {
        let had_lines = !self.batch.is_empty();
        let mut retry_in = Duration::from_millis(10);
        let mut reported = false;
        while !self.batch.is_empty() {
            self.health
                .write_started
                .store(self.health.now_ms(), Ordering::Relaxed);
            let result = self.sink.write(&self.batch);
            self.health.write_started.store(0, Ordering::Relaxed);
            let error = match result {
                Ok(0) => io::Error::new(io::ErrorKind::WriteZero, "the output took no bytes"),
                Ok(n) if self.done(n) => continue,
                // A full disk takes what fits in the file's last page and
                // fails only on the next write: what was taken was cut back.
                Ok(_) => io::Error::new(
                    io::ErrorKind::StorageFull,
                    "the output took only part of a record",
                ),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            self.health.failing.store(true, Ordering::Relaxed);
            if !reported {
                tracing::error!(error = %error, "writing the audit output failed; requests wait until it works again (on_full = \"drop\": records are dropped and counted)");
                reported = true;
            }
            if self.on_full == OnFull::Drop {
                let keep = match self.begun {
                    true => memchr::memchr(b'\n', &self.batch).map_or(0, |i| i + 1),
                    false => 0,
                };
                let lost = count_lines(&self.batch[keep..]);
                self.batch.truncate(keep);
                // Dropped lines are counted, not a break in the chain: it
                // goes on from the last line the output has.
                if let Some(chain) = &mut self.chain {
                    chain.resume_from(last_chain_value(&self.batch).unwrap_or(self.written));
                }
                self.health
                    .unwritten
                    .fetch_sub(lost as i64, Ordering::Relaxed);
                self.dropped.inc_by(lost);
                if keep == 0 {
                    return;
                }
            }
            std::thread::sleep(retry_in);
            retry_in = (retry_in * 2).min(MAX_RETRY_INTERVAL);
        }
        if let Some(state) = self.chain_state.as_ref().filter(|_| had_lines) {
            use std::os::unix::fs::FileExt;
            if let Err(e) = state.write_all_at(&self.written, 0) {
                tracing::warn!(error = %e, "the audit chain's resume point could not be recorded");
            }
        }
        if self.health.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the audit output takes writes again");
        }
    }

    /// `n` bytes of the batch went out: whole lines are done; a line cut
    /// short is removed again from a file, or left to finish on a stream.
    /// False if nothing remains written.
    fn done(&mut self, n: usize) -> bool {
        let whole = self.batch[..n]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let cut_short = n > whole;
        let finished = if cut_short && self.sink.cut_back((n - whole) as u64) {
            whole
        } else {
            n
        };
        self.begun = finished > whole;
        if let Some(last) = self
            .chain
            .as_ref()
            .and_then(|_| last_chain_value(&self.batch[..whole]))
        {
            self.written = last;
        }
        let lines = count_lines(&self.batch[..finished]);
        self.health
            .unwritten
            .fetch_sub(lines as i64, Ordering::Relaxed);
        self.batch.drain(..finished);
        finished > 0
    }
}

/// The chain value of the last whole line in `bytes`.
fn last_chain_value(bytes: &[u8]) -> Option<[u8; 64]> {
    let line = bytes.strip_suffix(b"\n")?;
    let start = memchr::memrchr(b'\n', line).map_or(0, |i| i + 1);
    crate::audit_chain::chain_value(&line[start..])
}

fn count_lines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// One JSON line. Written by hand because it runs once per request on the
/// proxy's own thread, where serde_json cost about 6,000 instructions a
/// record; `encoding_matches_serde_json` keeps it honest.
pub fn encode(record: &AuditRecord<'_>) -> Vec<u8> {
    // Room for a typical record, so the line is allocated once.
    let mut line = Vec::with_capacity(512);
    line.extend_from_slice(b"{\"ts\":\"");
    write_rfc3339(&mut line, record.ts);
    line.push(b'"');
    if let Some(event) = record.event {
        line.extend_from_slice(b",\"event\":");
        json_str(&mut line, event);
    }
    line.extend_from_slice(b",\"request_id\":");
    json_str(&mut line, record.request_id);
    line.extend_from_slice(b",\"caller\":");
    json_opt_str(&mut line, record.caller);
    line.extend_from_slice(b",\"datasource\":");
    json_opt_str(&mut line, record.datasource);
    line.extend_from_slice(b",\"method\":");
    json_str(&mut line, record.method);
    line.extend_from_slice(b",\"path\":");
    json_opt_str(&mut line, record.path);
    line.extend_from_slice(b",\"upstream\":");
    json_opt_addr(
        &mut line,
        record.upstream.map(|a| a.ip()),
        record.upstream.map(|a| a.port()),
    );
    line.extend_from_slice(b",\"egress_ip\":");
    json_opt_addr(&mut line, record.egress_ip, None);
    line.extend_from_slice(b",\"region\":");
    json_opt_str(&mut line, record.region);
    line.extend_from_slice(b",\"decision\":");
    json_str(&mut line, record.decision.as_str());
    line.extend_from_slice(b",\"reason\":");
    json_opt_str(&mut line, record.reason);
    line.extend_from_slice(b",\"status\":");
    match record.status {
        Some(status) => json_int(&mut line, status),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"request_bytes\":");
    json_int(&mut line, record.request_bytes);
    line.extend_from_slice(b",\"response_bytes\":");
    json_int(&mut line, record.response_bytes);
    // Milliseconds with microsecond precision, e.g. 12.345.
    let micros = record.duration.as_micros();
    line.extend_from_slice(b",\"duration_ms\":");
    json_int(&mut line, micros / 1000);
    let fraction = (micros % 1000) as u16;
    line.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ]);
    line.extend_from_slice(b",\"error\":");
    json_opt_str(&mut line, record.error);
    line.extend_from_slice(b",\"protocol\":");
    json_str(&mut line, record.protocol);
    line.extend_from_slice(b",\"credential\":");
    json_opt_str(&mut line, record.credential);
    line.extend_from_slice(b",\"client_user\":");
    json_opt_str(&mut line, record.client_user);
    line.extend_from_slice(b",\"db_user\":");
    json_opt_str(&mut line, record.db_user);
    line.extend_from_slice(b",\"statements\":");
    json_opt_int(&mut line, record.statements);
    if let Some(statement) = &record.statement {
        line.extend_from_slice(b",\"command\":");
        json_opt_str(&mut line, statement.command);
        line.extend_from_slice(b",\"rows\":");
        json_opt_int(&mut line, statement.rows);
        line.extend_from_slice(b",\"sqlstate\":");
        json_opt_str(&mut line, statement.sqlstate);
        line.extend_from_slice(b",\"statement\":");
        json_str(&mut line, statement.text);
        line.extend_from_slice(b",\"fingerprint\":");
        json_str(&mut line, statement.fingerprint);
    }
    line.extend_from_slice(b"}\n");
    line
}

/// One configuration event: its own keys, then every request key as null.
fn encode_event(
    at: SystemTime,
    event: Event,
    result: &str,
    message: &str,
    key_ids: Option<&[String]>,
) -> Vec<u8> {
    let mut line = Vec::with_capacity(512);
    line.extend_from_slice(b"{\"ts\":\"");
    write_rfc3339(&mut line, at);
    line.extend_from_slice(b"\",\"event\":");
    json_str(&mut line, event.as_str());
    line.extend_from_slice(b",\"result\":");
    json_str(&mut line, result);
    line.extend_from_slice(b",\"message\":");
    json_str(&mut line, message);
    line.extend_from_slice(b",\"key_ids\":");
    match key_ids {
        None => line.extend_from_slice(b"null"),
        Some(ids) => {
            line.push(b'[');
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                json_str(&mut line, id);
            }
            line.push(b']');
        }
    }
    for key in &REQUEST_KEYS[1..] {
        line.push(b',');
        json_str(&mut line, key);
        line.extend_from_slice(b":null");
    }
    line.extend_from_slice(b"}\n");
    line
}

/// A configuration event line naming the chain key and the value the
/// chain continues from (SPEC 12).
fn encode_chain_start(at: SystemTime, key_id: &str, prev: &[u8; 64]) -> Vec<u8> {
    let ids = [key_id.to_string()];
    let mut line = encode_event(at, Event::ChainStart, "ok", "audit chain", Some(&ids));
    line.truncate(line.len() - 2);
    line.extend_from_slice(b",\"key_id\":");
    json_str(&mut line, key_id);
    line.extend_from_slice(b",\"prev\":\"");
    line.extend_from_slice(prev);
    line.extend_from_slice(b"\"}\n");
    line
}

fn json_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json_opt_int(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => json_int(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Addresses print only digits, dots, colons and brackets: no escaping.
/// IPv4 is written digit by digit; `fmt` cost more than the whole rest of
/// the record.
fn json_opt_addr(out: &mut Vec<u8>, ip: Option<IpAddr>, port: Option<u16>) {
    let Some(ip) = ip else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    match (ip, port) {
        (IpAddr::V4(v4), _) => {
            let [a, b, c, d] = v4.octets();
            json_int(out, a);
            for octet in [b, c, d] {
                out.push(b'.');
                json_int(out, octet);
            }
            if let Some(port) = port {
                out.push(b':');
                json_int(out, port);
            }
        }
        // Writing into a Vec cannot fail.
        (IpAddr::V6(v6), Some(port)) => drop(write!(out, "[{v6}]:{port}")),
        (IpAddr::V6(v6), None) => drop(write!(out, "{v6}")),
    }
    out.push(b'"');
}

/// A JSON string: quotes, backslashes and control characters escaped,
/// everything else (UTF-8 included) copied as it is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Almost every string needs no escaping; this check vectorises.
    let needs_escape = bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escaped);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_present_even_when_null() {
        let r = AuditRecord {
            ts: SystemTime::now(),
            event: None,
            request_id: "1",
            caller: None,
            datasource: None,
            method: "GET",
            path: Some("/x"),
            upstream: None,
            egress_ip: None,
            region: None,
            decision: Decision::Deny,
            reason: Some("no data source"),
            status: Some(404),
            request_bytes: 0,
            response_bytes: 10,
            duration: Duration::from_micros(500),
            error: Some("unknown_datasource"),
            protocol: "http",
            credential: None,
            client_user: None,
            db_user: None,
            statements: None,
            statement: None,
        };
        let spec_keys = [
            "ts",
            "request_id",
            "caller",
            "datasource",
            "method",
            "path",
            "upstream",
            "egress_ip",
            "region",
            "decision",
            "reason",
            "status",
            "request_bytes",
            "response_bytes",
            "duration_ms",
            "error",
            "protocol",
            "credential",
            "client_user",
            "db_user",
            "statements",
        ];
        assert_eq!(
            REQUEST_KEYS, spec_keys,
            "the events' null keys are the SPEC's"
        );
        let line = encode(&r);
        let offsets = key_offsets(&line, &spec_keys).expect("every key");
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "in order: {offsets:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v.as_object().unwrap().len(),
            spec_keys.len(),
            "and no other"
        );
        assert_eq!(v["decision"], "deny");
        assert!(v["egress_ip"].is_null());
    }

    /// The hand-written encoder against serde_json, on every kind of
    /// character a path or reason may carry.
    #[test]
    fn encoding_matches_serde_json() {
        let awkward = "q\"uote \\ back\nline\r\t tab \u{1} \u{1f} \u{7f} é 日本 /a%2Fb";
        let r = AuditRecord {
            ts: SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_341_600_123_456),
            event: Some("session"),
            request_id: "00000000000000ff",
            caller: Some("billing"),
            datasource: Some("crm"),
            method: "POST",
            path: Some(awkward),
            upstream: Some("[2001:db8::1]:443".parse().unwrap()),
            egress_ip: Some("203.0.113.7".parse().unwrap()),
            region: Some("eu"),
            decision: Decision::Allow,
            reason: Some(awkward),
            status: None,
            request_bytes: u64::MAX,
            response_bytes: 0,
            duration: Duration::from_micros(12_345_678),
            error: None,
            protocol: "postgres",
            credential: Some("caller"),
            client_user: Some(awkward),
            db_user: Some("billing_ro"),
            statements: Some(3),
            statement: None,
        };
        let line = encode(&r);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let expected = serde_json::json!({
            "ts": "2026-11-22T10:00:00.123456Z",
            "event": "session",
            "request_id": "00000000000000ff",
            "caller": "billing",
            "datasource": "crm",
            "method": "POST",
            "path": awkward,
            "upstream": "[2001:db8::1]:443",
            "egress_ip": "203.0.113.7",
            "region": "eu",
            "decision": "allow",
            "reason": awkward,
            "status": null,
            "request_bytes": u64::MAX,
            "response_bytes": 0,
            "duration_ms": 12345.678,
            "error": null,
            "protocol": "postgres",
            "credential": "caller",
            "client_user": awkward,
            "db_user": "billing_ro",
            "statements": 3,
        });
        assert_eq!(v, expected);
        let other = AuditRecord {
            duration: Duration::from_micros(7),
            upstream: Some("10.0.255.1:5432".parse().unwrap()),
            egress_ip: Some("2001:db8::7".parse().unwrap()),
            ..r
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&other)).unwrap();
        assert_eq!(v["duration_ms"], 0.007);
        assert_eq!(v["upstream"], "10.0.255.1:5432");
        assert_eq!(v["egress_ip"], "2001:db8::7");
    }

    fn rfc3339(at: SystemTime) -> String {
        let mut out = Vec::new();
        write_rfc3339(&mut out, at);
        String::from_utf8(out).unwrap()
    }

    /// Where each key starts in `line`, in the order given; `None` if one
    /// is missing.
    fn key_offsets(line: &[u8], keys: &[&str]) -> Option<Vec<usize>> {
        let text = std::str::from_utf8(line).unwrap();
        keys.iter()
            .map(|k| text.find(&format!("\"{k}\":")))
            .collect()
    }

    /// An event line: its own fields, escaped like any string, and every
    /// request key present and null.
    #[test]
    fn an_event_has_every_request_key_as_null() {
        let message = "datasources.a.bogus: unknown field `bogus` \"quoted\"\nnext";
        let ids = ["k1".to_string(), "k\"2".to_string()];
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_341_600_123_456);
        let line = encode_event(at, Event::Reload, "failed", message, Some(&ids));
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let mut expected = serde_json::json!({
            "ts": "2026-11-22T10:00:00.123456Z",
            "event": "reload",
            "result": "failed",
            "message": message,
            "key_ids": ["k1", "k\"2"],
        });
        for key in &REQUEST_KEYS[1..] {
            expected[*key] = serde_json::Value::Null;
        }
        assert_eq!(v, expected);
        let none = encode_event(at, Event::Drain, "ok", "draining", None);
        let v: serde_json::Value = serde_json::from_slice(&none).unwrap();
        assert!(v["key_ids"].is_null());
        assert_eq!(v["event"], "drain");
    }

    /// The hand-written calendar against the `time` crate, across leap
    /// years, century rules and both ends of the range that matters.
    #[test]
    fn timestamps_match_the_time_crate() {
        let day = 86_400u64;
        let mut instants: Vec<u64> = vec![
            0,
            951_782_400,     // 2000-02-29
            951_868_799,     // 2000-02-29 23:59:59
            4_107_542_400,   // 2100-03-01
            4_102_444_799,   // 2099-12-31 23:59:59
            1_795_860_000,   // 2026-11-28 10:00:00
            253_402_300_799, // 9999-12-31 23:59:59
        ];
        instants.extend((0..40_000).map(|i| i * 3 * day + i % day));
        for secs in instants {
            let micros = (secs % 1_000_000) as u32;
            let at = SystemTime::UNIX_EPOCH + Duration::new(secs, micros * 1000);
            let dt = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second(),
                micros
            );
            assert_eq!(rfc3339(at), expected, "{secs}");
        }
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(rfc3339(before_epoch), "1970-01-01T00:00:00.000000Z");
    }
}
