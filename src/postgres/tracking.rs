//! Follows statements through a session for metrics and the statement
//! audit (SPEC section 9): a simple `Query`, or an `Execute` of a portal
//! bound to a statement prepared earlier, is matched with the server's
//! `CommandComplete` or `ErrorResponse` for it, in order, one `Sync` (or
//! simple query) at a time. Only literal-free text is kept; bind values
//! are never read, and of an error only its SQLSTATE.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{Histogram, IntCounter};

use crate::audit::{AuditRecord, Decision, StatementFields};
use crate::config::CredentialSource;
use crate::metrics::DB_COMMANDS;
use crate::state::Shared;
use crate::statements::{normalize, Dialect, Normalized};

/// How much of a query's text is read for its normalised form; a longer
/// text is normalised from its start (an unfinished literal at the cut
/// becomes a placeholder).
const QUERY_CAPTURE: usize = 64 * 1024;
/// Portal and statement names are identifiers.
const NAME_CAPTURE: usize = 256;
/// Enough of a completion tag, or of an ErrorResponse for its SQLSTATE.
const SERVER_CAPTURE: usize = 256;
/// Named statements and portals remembered per session; past it, new
/// names are executed without text (PgBouncer-style clients prepare a
/// bounded set).
const MAX_NAMES: usize = 1024;

/// Who the statements belong to, for their audit records.
pub struct SessionInfo {
    pub request_id: String,
    pub caller: Option<String>,
    pub datasource: String,
    pub region: Option<String>,
    pub upstream: Option<std::net::SocketAddr>,
    pub egress_ip: Option<std::net::IpAddr>,
    pub credential: Option<CredentialSource>,
    pub client_user: Option<String>,
    pub db_user: Option<String>,
}

struct Pending {
    text: Option<Arc<Normalized>>,
    started: Instant,
    /// The Sync (or simple query) this statement completes before.
    sync: u64,
}

#[derive(Default)]
struct State {
    prepared: HashMap<Vec<u8>, Arc<Normalized>>,
    portals: HashMap<Vec<u8>, Option<Arc<Normalized>>>,
    pending: VecDeque<Pending>,
    /// The statement the server is answering: a simple query with several
    /// statements completes each under the same text.
    current: Option<(Option<Arc<Normalized>>, Instant)>,
    syncs_sent: u64,
    syncs_done: u64,
    /// Statement records made, waiting to be queued for the audit writer.
    records: Vec<Vec<u8>>,
}

pub struct Tracker<'a> {
    shared: &'a Shared,
    session: &'a SessionInfo,
    /// This data source's series, looked up once per session and per
    /// command instead of at every statement.
    duration: Histogram,
    by_command: [OnceLock<IntCounter>; DB_COMMANDS.len() + 1],
    /// `[audit] statements = "fingerprint"`.
    audit: bool,
    state: Mutex<State>,
    /// Statements the client sent (simple queries and executes).
    pub statements: AtomicU64,
}

fn cstr(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

impl<'a> Tracker<'a> {
    pub fn new(shared: &'a Shared, session: &'a SessionInfo, audit: bool) -> Self {
        Tracker {
            duration: shared
                .metrics
                .db
                .statement_duration
                .with_label_values(&[session.datasource.as_str()]),
            by_command: std::array::from_fn(|_| OnceLock::new()),
            shared,
            session,
            audit,
            state: Mutex::new(State::default()),
            statements: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How much of a client message's body to look at.
    pub fn client_peek(&self, tag: u8) -> usize {
        match tag {
            b'Q' | b'P' if self.audit => QUERY_CAPTURE,
            b'B' | b'E' if self.audit => NAME_CAPTURE,
            _ => 0,
        }
    }

    pub fn server_peek(&self, tag: u8) -> usize {
        match tag {
            b'C' | b'E' => SERVER_CAPTURE,
            _ => 0,
        }
    }

    fn text(&self, sql: &[u8]) -> Option<Arc<Normalized>> {
        self.audit.then(|| {
            let sql = cstr(sql).0;
            Arc::new(normalize(&String::from_utf8_lossy(sql), Dialect::Postgres))
        })
    }

    pub fn client_message(&self, tag: u8, body: &[u8]) {
        if !matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'S') {
            return;
        }
        let mut state = self.state();
        let state = &mut *state;
        match tag {
            b'Q' => {
                self.statements.fetch_add(1, Ordering::Relaxed);
                state.syncs_sent += 1;
                let pending = Pending {
                    text: self.text(body),
                    started: Instant::now(),
                    sync: state.syncs_sent,
                };
                state.pending.push_back(pending);
            }
            b'P' if self.audit => {
                let (name, rest) = cstr(body);
                if name.is_empty() || state.prepared.len() < MAX_NAMES {
                    if let Some(text) = self.text(rest) {
                        state.prepared.insert(name.to_vec(), text);
                    }
                }
            }
            b'B' if self.audit => {
                let (portal, rest) = cstr(body);
                let statement = cstr(rest).0;
                if portal.is_empty() || state.portals.len() < MAX_NAMES {
                    let text = state.prepared.get(statement).cloned();
                    state.portals.insert(portal.to_vec(), text);
                }
            }
            b'E' => {
                self.statements.fetch_add(1, Ordering::Relaxed);
                let text = state.portals.get(cstr(body).0).cloned().flatten();
                let pending = Pending {
                    text,
                    started: Instant::now(),
                    sync: state.syncs_sent + 1,
                };
                state.pending.push_back(pending);
            }
            b'S' => state.syncs_sent += 1,
            _ => {}
        }
    }

    pub fn server_message(&self, tag: u8, body: &[u8]) {
        if !matches!(tag, b'C' | b'E' | b'Z') {
            return;
        }
        let mut state = self.state();
        let state = &mut *state;
        match tag {
            b'C' | b'E' => {
                let in_this_sync = state
                    .pending
                    .front()
                    .is_some_and(|p| p.sync <= state.syncs_done + 1);
                if in_this_sync {
                    if let Some(p) = state.pending.pop_front() {
                        state.current = Some((p.text, p.started));
                    }
                }
                let (text, started) = state.current.clone().unwrap_or((None, Instant::now()));
                let took = started.elapsed();
                if tag == b'C' {
                    let tag_text = String::from_utf8_lossy(cstr(body).0);
                    let verb = tag_text.split(' ').next().unwrap_or("");
                    let index = DB_COMMANDS
                        .iter()
                        .position(|c| c.eq_ignore_ascii_case(verb))
                        .unwrap_or(DB_COMMANDS.len());
                    let command = DB_COMMANDS.get(index).copied().unwrap_or("OTHER");
                    let rows = tag_text.rsplit(' ').next().and_then(|n| n.parse().ok());
                    self.count(index, command, took);
                    if let Some(text) = &text {
                        let line = self.record(text, Some(command), rows, None, took);
                        state.records.push(line);
                    }
                } else if let Some(text) = &text {
                    let sqlstate = super::wire::error_field(body, b'C');
                    let line = self.record(text, None, None, sqlstate, took);
                    state.records.push(line);
                }
            }
            b'Z' => {
                state.syncs_done += 1;
                let done = state.syncs_done;
                state.pending.retain(|p| p.sync > done);
                state.current = None;
            }
            _ => {}
        }
    }

    fn count(&self, index: usize, command: &str, took: Duration) {
        self.by_command[index]
            .get_or_init(|| {
                self.shared
                    .metrics
                    .db
                    .statements
                    .with_label_values(&[self.session.datasource.as_str(), command])
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    fn record(
        &self,
        text: &Normalized,
        command: Option<&str>,
        rows: Option<u64>,
        sqlstate: Option<&str>,
        took: Duration,
    ) -> Vec<u8> {
        let s = self.session;
        crate::audit::encode(&AuditRecord {
            ts: SystemTime::now(),
            event: Some("statement"),
            request_id: &s.request_id,
            caller: s.caller.as_deref(),
            datasource: Some(&s.datasource),
            method: "postgres",
            path: None,
            upstream: s.upstream,
            egress_ip: s.egress_ip,
            region: s.region.as_deref(),
            decision: Decision::Allow,
            reason: None,
            status: None,
            request_bytes: 0,
            response_bytes: 0,
            duration: took,
            error: None,
            protocol: "postgres",
            credential: s.credential.map(CredentialSource::as_str),
            client_user: s.client_user.as_deref(),
            db_user: s.db_user.as_deref(),
            statements: None,
            statement: Some(StatementFields {
                command,
                rows,
                sqlstate,
                text: &text.text,
                fingerprint: &text.fingerprint,
            }),
        })
    }

    /// Statement records made since the last call, for the audit writer;
    /// none without statement audit (nor a lock taken).
    pub fn take_records(&self) -> Option<Vec<Vec<u8>>> {
        if !self.audit {
            return None;
        }
        Some(std::mem::take(&mut self.state().records))
    }
}
