//! The audit trail: one JSON line per request, written by a dedicated
//! thread so request tasks never do file I/O. The queue is bounded and a
//! full queue makes requests wait: audit records are never silently lost.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::config::{AuditOutput, OnFull};

const QUEUE_DEPTH: usize = 4096;
/// How often the writer takes what has queued and writes it out.
const WRITE_INTERVAL: Duration = Duration::from_millis(10);

/// SPEC section 7. Every key is always present; `None` serialises as null.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub ts: String,
    pub request_id: &'a str,
    pub caller: Option<&'a str>,
    pub datasource: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub upstream: Option<String>,
    pub egress_ip: Option<String>,
    pub region: Option<&'a str>,
    pub decision: Decision,
    pub reason: Option<&'a str>,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_ms: f64,
    pub error: Option<&'static str>,
}

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

enum Message {
    Line(Vec<u8>),
    Flush(std_mpsc::SyncSender<()>),
    /// Reopen the output file (after logrotate moved it away).
    Reopen,
}

/// Kinds of configuration event recorded in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Start,
    Reload,
    Drain,
}

/// A configuration event: the request fields are present and null, so every
/// line of the trail has the same keys.
#[derive(Debug, Serialize)]
struct EventRecord<'a> {
    ts: String,
    event: Event,
    result: &'a str,
    message: &'a str,
    key_ids: Option<&'a [String]>,
    request_id: Option<()>,
    caller: Option<()>,
    datasource: Option<()>,
    method: Option<()>,
    path: Option<()>,
    upstream: Option<()>,
    egress_ip: Option<()>,
    region: Option<()>,
    decision: Option<()>,
    reason: Option<()>,
    status: Option<()>,
    request_bytes: Option<()>,
    response_bytes: Option<()>,
    duration_ms: Option<()>,
    error: Option<()>,
}

pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    on_full: OnFull,
    dropped: prometheus::IntCounter,
}

impl AuditLog {
    /// Opens the output (a file is created or appended, mode 0640) and
    /// starts the writer thread.
    pub fn open(
        output: &AuditOutput,
        on_full: OnFull,
        dropped: prometheus::IntCounter,
    ) -> io::Result<AuditLog> {
        let sink = open_output(output)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let output = output.clone();
        std::thread::Builder::new()
            .name("sealgate-audit".into())
            .spawn(move || write_loop(rx, BufWriter::with_capacity(64 * 1024, sink), output))?;
        Ok(AuditLog {
            tx,
            on_full,
            dropped,
        })
    }

    /// Queues a record. While the writer is behind, the request waits, or
    /// with `on_full = "drop"` the record is dropped and counted.
    pub async fn record(&self, record: &AuditRecord<'_>) {
        let line = Message::Line(encode(record));
        let sent = match self.on_full {
            OnFull::Block => self.tx.send(line).await.is_ok(),
            OnFull::Drop => match self.tx.try_send(line) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.inc();
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        };
        if !sent {
            tracing::error!("audit writer has stopped; a record was not written");
        }
    }

    /// Records a configuration event. Events are rare and may come from
    /// any context, so they never wait; one that finds the queue full is
    /// logged instead, never silently lost.
    pub fn event(&self, event: Event, result: &str, message: &str, key_ids: Option<&[String]>) {
        let record = EventRecord {
            ts: now_rfc3339(),
            event,
            result,
            message,
            key_ids,
            request_id: None,
            caller: None,
            datasource: None,
            method: None,
            path: None,
            upstream: None,
            egress_ip: None,
            region: None,
            decision: None,
            reason: None,
            status: None,
            request_bytes: None,
            response_bytes: None,
            duration_ms: None,
            error: None,
        };
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        line.push(b'\n');
        if self.tx.try_send(Message::Line(line)).is_err() {
            tracing::error!(
                ?event,
                result,
                message,
                "the audit queue is full; this configuration event was not recorded"
            );
        }
    }

    /// After logrotate moved the file away: writes go to a new file.
    pub fn reopen(&self) {
        if self.tx.try_send(Message::Reopen).is_err() {
            tracing::error!("the audit queue is full; the audit output was not reopened");
        }
    }

    /// Writes out everything queued so far; for shutdown, from a plain thread.
    pub fn flush_blocking(&self, timeout: Duration) {
        let (done_tx, done_rx) = std_mpsc::sync_channel(1);
        if self.tx.blocking_send(Message::Flush(done_tx)).is_ok()
            && done_rx.recv_timeout(timeout).is_err()
        {
            tracing::error!("audit records may not all have been written before exit");
        }
    }
}

fn open_output(output: &AuditOutput) -> io::Result<Box<dyn Write + Send>> {
    Ok(match output {
        AuditOutput::Stdout => Box::new(io::stdout()),
        AuditOutput::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("audit output {}: {e}", path.display()))
                })?;
            Box::new(file)
        }
    })
}

fn encode(record: &AuditRecord<'_>) -> Vec<u8> {
    let mut line = Vec::with_capacity(384);
    // Serialising plain strings and numbers into a Vec cannot fail.
    if serde_json::to_writer(&mut line, record).is_err() {
        line.clear();
        line.extend_from_slice(br#"{"error":"audit_encoding_failed"}"#);
    }
    line.push(b'\n');
    line
}

fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut out: BufWriter<Box<dyn Write + Send>>,
    output: AuditOutput,
) {
    // The writer polls instead of being woken for every record: a wake-up
    // per request costs a context switch on the proxy's own core, which is
    // most of what auditing would otherwise cost. A record reaches the
    // output within one poll interval; a full queue still makes requests
    // wait (or drop) exactly as before.
    loop {
        loop {
            match rx.try_recv() {
                Ok(message) => handle(message, &mut out, &output),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "flushing the audit output failed");
        }
        std::thread::sleep(WRITE_INTERVAL);
    }
}

fn handle(message: Message, out: &mut BufWriter<Box<dyn Write + Send>>, output: &AuditOutput) {
    match message {
        Message::Line(line) => {
            if let Err(e) = out.write_all(&line) {
                tracing::error!(error = %e, "writing the audit record failed");
            }
        }
        Message::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
        }
        Message::Reopen => {
            let _ = out.flush();
            match open_output(output) {
                Ok(sink) => *out = BufWriter::with_capacity(64 * 1024, sink),
                Err(e) => {
                    tracing::error!(error = %e, "reopening the audit output failed; still writing to the old one")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_present_even_when_null() {
        let r = AuditRecord {
            ts: now_rfc3339(),
            request_id: "1",
            caller: None,
            datasource: None,
            method: "GET",
            path: "/x",
            upstream: None,
            egress_ip: None,
            region: None,
            decision: Decision::Deny,
            reason: Some("no data source"),
            status: 404,
            request_bytes: 0,
            response_bytes: 10,
            duration_ms: 0.5,
            error: Some("unknown_datasource"),
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&r)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
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
        ] {
            assert!(keys.contains(&k), "{k} missing");
        }
        assert_eq!(v["decision"], "deny");
        assert!(v["egress_ip"].is_null());
    }
}
