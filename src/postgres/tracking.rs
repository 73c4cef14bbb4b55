//! Follows statements through a session for metrics and the statement
//! audit (SPEC section 9): a simple `Query`, or an `Execute` of a portal
//! bound to a statement prepared earlier, is matched with the server's
//! `CommandComplete` or `ErrorResponse` for it, in order, one `Sync` (or
//! simple query) at a time. Only literal-free text is kept; bind values
//! are never read, and of an error only its SQLSTATE.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::sessions::{Finished, StatementLog};
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
    log: StatementLog<'a>,
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
    pub fn new(log: StatementLog<'a>) -> Self {
        Tracker {
            log,
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
            b'Q' | b'P' if self.log.audit => QUERY_CAPTURE,
            b'B' | b'E' if self.log.audit => NAME_CAPTURE,
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
        self.log.audit.then(|| {
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
            b'P' if self.log.audit => {
                let (name, rest) = cstr(body);
                if name.is_empty() || state.prepared.len() < MAX_NAMES {
                    if let Some(text) = self.text(rest) {
                        state.prepared.insert(name.to_vec(), text);
                    }
                }
            }
            b'B' if self.log.audit => {
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
                let tag_text = String::from_utf8_lossy(cstr(body).0);
                let done = if tag == b'C' {
                    Finished {
                        text: text.as_deref(),
                        verb: tag_text.split(' ').next(),
                        rows: tag_text.rsplit(' ').next().and_then(|n| n.parse().ok()),
                        sqlstate: None,
                        took: started.elapsed(),
                    }
                } else {
                    Finished {
                        text: text.as_deref(),
                        verb: None,
                        rows: None,
                        sqlstate: Some(super::wire::error_field(body, b'C').unwrap_or("XX000")),
                        took: started.elapsed(),
                    }
                };
                if let Some(line) = self.log.finished(&done) {
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

    /// Statement records made since the last call, for the audit writer;
    /// none without statement audit (nor a lock taken).
    pub fn take_records(&self) -> Option<Vec<Vec<u8>>> {
        if !self.log.audit {
            return None;
        }
        Some(std::mem::take(&mut self.state().records))
    }
}
