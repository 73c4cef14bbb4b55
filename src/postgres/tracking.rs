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

#[cfg(test)]
mod tests {
    mod properties {
        use super::super::*;
        use crate::config::Protocol;
        use crate::framing::tests::block_on;
        use crate::postgres::wire;
        use crate::sessions::tests::{records_hide, statement_log};
        use proptest::prelude::*;

        /// One message of a session, either way; the secret is put in
        /// every place the audit must never show: literals, bind values,
        /// server error text.
        #[derive(Debug, Clone)]
        enum Step {
            Query(usize),
            Parse(u8, usize),
            Bind(u8, u8),
            Execute(u8),
            Sync,
            Complete(usize),
            Error,
            Ready,
            Client(u8, Vec<u8>),
            Server(u8, Vec<u8>),
        }

        fn steps() -> impl Strategy<Value = Vec<Step>> {
            let bytes = || prop::collection::vec(any::<u8>(), 0..40);
            prop::collection::vec(
                prop_oneof![
                    any::<usize>().prop_map(Step::Query),
                    (0u8..3, any::<usize>()).prop_map(|(n, s)| Step::Parse(n, s)),
                    (0u8..3, 0u8..3).prop_map(|(p, s)| Step::Bind(p, s)),
                    (0u8..3).prop_map(Step::Execute),
                    Just(Step::Sync),
                    (0usize..4).prop_map(Step::Complete),
                    Just(Step::Error),
                    Just(Step::Ready),
                    (any::<u8>(), bytes()).prop_map(|(t, b)| Step::Client(t, b)),
                    (any::<u8>(), bytes()).prop_map(|(t, b)| Step::Server(t, b)),
                ],
                0..40,
            )
        }

        /// A PostgreSQL literal holding `secret`, in each quoting style.
        fn literal(secret: &str, style: usize) -> String {
            match style % 5 {
                0 => format!("'{secret}'"),
                1 => format!("E'{secret}\\n'"),
                2 => format!("$${secret}$$"),
                3 => format!("$q${secret}$q$"),
                _ => format!("U&'{secret}'"),
            }
        }

        fn name(n: u8) -> Vec<u8> {
            if n == 0 {
                vec![0]
            } else {
                vec![b'a' + n, 0]
            }
        }

        /// (from the client, tag, body)
        fn render(step: &Step, secret: &str) -> (bool, u8, Vec<u8>) {
            match step {
                Step::Query(style) => (
                    true,
                    b'Q',
                    format!("SELECT a FROM t WHERE b = {}\0", literal(secret, *style)).into_bytes(),
                ),
                Step::Parse(n, style) => {
                    let mut body = name(*n);
                    body.extend(
                        format!("INSERT INTO t VALUES ({}, $1)\0", literal(secret, *style)).bytes(),
                    );
                    body.extend([0, 0]);
                    (true, b'P', body)
                }
                Step::Bind(portal, statement) => {
                    let mut body = name(*portal);
                    body.extend(name(*statement));
                    body.extend([0, 0, 0, 1]);
                    body.extend((secret.len() as u32).to_be_bytes());
                    body.extend(secret.bytes());
                    body.extend([0, 0]);
                    (true, b'B', body)
                }
                Step::Execute(portal) => {
                    let mut body = name(*portal);
                    body.extend([0, 0, 0, 0]);
                    (true, b'E', body)
                }
                Step::Sync => (true, b'S', Vec::new()),
                Step::Complete(i) => {
                    let tag = ["SELECT 1", "INSERT 0 1", "UPDATE 3", "COPY 10"][*i % 4];
                    (false, b'C', format!("{tag}\0").into_bytes())
                }
                Step::Error => (
                    false,
                    b'E',
                    format!("SERROR\0C22P02\0Minvalid input: {secret}\0Ddetail {secret}\0\0")
                        .into_bytes(),
                ),
                Step::Ready => (false, b'Z', b"I".to_vec()),
                Step::Client(tag, body) => (true, *tag, body.clone()),
                Step::Server(tag, body) => (false, *tag, body.clone()),
            }
        }

        /// Sessions captured from real clients against PostgreSQL 15
        /// (tests/corpus/README.md): psql's simple queries, COPY both ways,
        /// LISTEN/NOTIFY, an error, a 70 kB row and `\bind`; pgbench's
        /// extended protocol.
        const CAPTURED: [(&[u8], &[u8]); 2] = [
            (
                include_bytes!("../../tests/corpus/psql.client"),
                include_bytes!("../../tests/corpus/psql.server"),
            ),
            (
                include_bytes!("../../tests/corpus/pgbench.client"),
                include_bytes!("../../tests/corpus/pgbench.server"),
            ),
        ];

        /// Values the captured psql session sent as literals, bind values
        /// and COPY data: none may be recorded.
        const CAPTURED_VALUES: [&str; 6] = [
            "Brien",
            "tab",
            "dollar",
            "bound value",
            "copied one",
            "hello",
        ];

        /// A captured client stream's typed messages: after its
        /// SSLRequest and StartupMessage, which have no tag.
        fn after_startup(client: &[u8]) -> &[u8] {
            let mut rest = client;
            while let Ok((code, _)) = block_on(wire::read_startup(&mut rest)) {
                if code != wire::SSL_REQUEST {
                    break;
                }
            }
            rest
        }

        /// A captured server stream's messages after login, through its
        /// first ReadyForQuery: sealgate logs in itself, and relays (and
        /// tracks) what follows.
        fn after_login(server: &[u8]) -> &[u8] {
            let mut rest = server.strip_prefix(b"N").unwrap_or(server);
            while let Ok((tag, _)) = block_on(wire::read_message(&mut rest, usize::MAX)) {
                if tag == b'Z' {
                    break;
                }
            }
            rest
        }

        /// The statement fields of the records a session leaves, its
        /// streams fed in pieces cut at `cuts`.
        fn records_of(
            client: &[u8],
            server: &[u8],
            cuts: &[prop::sample::Index],
        ) -> Vec<[serde_json::Value; 4]> {
            let log = statement_log(Protocol::Postgres);
            let tracker = Tracker::new(log);
            let feed = |stream: &[u8], client_side: bool| {
                let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                at.push(stream.len());
                at.sort_unstable();
                let mut frames = crate::postgres::relay::Frames::default();
                let mut from = 0;
                for to in at {
                    let fed = if client_side {
                        frames.feed(
                            &stream[from..to],
                            |t| tracker.client_peek(t),
                            |t, b| tracker.client_message(t, b),
                        )
                    } else {
                        frames.feed(
                            &stream[from..to],
                            |t| tracker.server_peek(t),
                            |t, b| tracker.server_message(t, b),
                        )
                    };
                    assert!(fed.is_ok(), "a captured stream is well framed");
                    from = to;
                }
                assert!(
                    frames.at_boundary(),
                    "a captured stream ends between messages"
                );
            };
            feed(client, true);
            feed(server, false);
            tracker
                .take_records()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(r).unwrap_or_default();
                    [
                        v["statement"].clone(),
                        v["command"].clone(),
                        v["rows"].clone(),
                        v["sqlstate"].clone(),
                    ]
                })
                .collect()
        }

        proptest! {
            #[test]
            fn captured_sessions_are_recorded_alike_however_cut_and_without_their_values(
                session in 0usize..CAPTURED.len(),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
            ) {
                let (client, server) = CAPTURED[session];
                let (client, server) = (after_startup(client), after_login(server));
                let whole = records_of(client, server, &[]);
                prop_assert!(whole.len() > 10, "{} statement records", whole.len());
                prop_assert_eq!(&records_of(client, server, &cuts), &whole);
                for record in &whole {
                    let statement = record[0].as_str().unwrap_or_default();
                    for value in CAPTURED_VALUES {
                        prop_assert!(!statement.contains(value), "{}", statement);
                    }
                    // Each statement is recorded under its own completion
                    // (EXECUTE and END complete as what they run or do).
                    let verb = statement.split([' ', ';']).next().unwrap_or_default();
                    if let (Some(command), false) = (record[1].as_str(), ["EXECUTE", "END"].contains(&verb)) {
                        prop_assert_eq!(verb, command, "{}", statement);
                    }
                }
            }

            #[test]
            fn no_literal_bind_value_or_error_text_reaches_a_statement_record(
                secret in "secret[a-z0-9]{10}",
                steps in steps(),
            ) {
                let log = statement_log(Protocol::Postgres);
                let tracker = Tracker::new(log);
                let mut records = Vec::new();
                for step in &steps {
                    let (from_client, tag, body) = render(step, &secret);
                    if from_client {
                        let seen = tracker.client_peek(tag).min(body.len());
                        tracker.client_message(tag, &body[..seen]);
                    } else {
                        let seen = tracker.server_peek(tag).min(body.len());
                        tracker.server_message(tag, &body[..seen]);
                    }
                    records.extend(tracker.take_records().unwrap_or_default());
                }
                records_hide(&records, &secret)?;
            }
        }
    }
}
