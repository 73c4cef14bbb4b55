//! Prometheus metrics. Label values come only from config (data source and
//! caller names) or from small fixed sets (status codes), never from a
//! request's path, host or error text, so cardinality stays bounded.

use std::sync::{Mutex, PoisonError};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `datasource` label for requests that named no configured data
/// source; data source names cannot start with '-', so it never collides.
pub const NO_DATASOURCE: &str = "-";

/// Why sealgate closed a caller's connection to protect itself: the
/// `reason` label of `sealgate_downstream_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head in time (idle keep-alive connections too).
    HeadTimeout,
    TlsHandshakeTimeout,
    /// A request under way waited too long for the caller.
    IdleTimeout,
    ConnectionLimit,
}

impl CloseReason {
    const ALL: [CloseReason; 4] = [
        CloseReason::HeadTimeout,
        CloseReason::TlsHandshakeTimeout,
        CloseReason::IdleTimeout,
        CloseReason::ConnectionLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            CloseReason::HeadTimeout => "head_timeout",
            CloseReason::TlsHandshakeTimeout => "tls_handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ConnectionLimit => "connection_limit",
        }
    }
}

/// The series every request of one data source updates, looked up once per
/// data source (and config) instead of hashing its name on every request.
pub struct DataSourceSeries {
    datasource: String,
    pub duration: Histogram,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    /// `sealgate_requests_total` children this data source has counted,
    /// by caller and status: nearly every request repeats one of a few
    /// pairs, and finding it here skips hashing three labels.
    answered: Mutex<Vec<(String, u16, IntCounter)>>,
}

/// How many caller and status pairs a data source keeps at hand; rarer
/// pairs are looked up in the vector each time.
const ANSWERED_KEPT: usize = 16;

impl DataSourceSeries {
    fn of(
        duration: &HistogramVec,
        request_bytes: &IntCounterVec,
        response_bytes: &IntCounterVec,
        datasource: &str,
    ) -> DataSourceSeries {
        DataSourceSeries {
            datasource: datasource.to_owned(),
            duration: duration.with_label_values(&[datasource]),
            request_bytes: request_bytes.with_label_values(&[datasource]),
            response_bytes: response_bytes.with_label_values(&[datasource]),
            answered: Mutex::new(Vec::new()),
        }
    }

    /// Counts one request answered to `caller` with `status` (0 when no
    /// response was sent).
    pub fn count_answer(&self, requests: &IntCounterVec, caller: &str, status: u16) {
        // A panic elsewhere cannot leave the list half-written: keep using it.
        let mut answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, counter)) = answered
            .iter()
            .find(|(c, s, _)| *s == status && c == caller)
        {
            return counter.inc();
        }
        let code = http::StatusCode::from_u16(status);
        let code = code.as_ref().map_or("0", |s| s.as_str());
        let counter = requests.with_label_values(&[&self.datasource, caller, code]);
        counter.inc();
        if answered.len() < ANSWERED_KEPT {
            answered.push((caller.to_owned(), status, counter));
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub active_requests: IntGauge,
    pub credential_open_failures: IntCounterVec,
    /// Minted credentials' fetches (SPEC section 11), by result.
    pub credential_refreshes: IntCounterVec,
    /// When each data source's credential stops working: a token's expiry
    /// or `expires_at`.
    pub credential_expiry: GaugeVec,
    /// When each caller's grant of a data source ends (`not_after`).
    pub caller_grant_expiry: GaugeVec,
    pub config_reloads: IntCounterVec,
    pub egress_denied: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    /// One counter per `CloseReason`, in `CloseReason::ALL` order, looked
    /// up once here instead of hashing the label at every close.
    downstream_closed: [IntCounter; CloseReason::ALL.len()],
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    /// The series of requests that named no configured data source.
    pub no_datasource: DataSourceSeries,
    pub audit_dropped: IntCounter,
    pub tls_cert_expiry: GaugeVec,
    pub secrets_scrubbed: IntCounterVec,
    /// Requests whose caller was not identified (`refused`, 401) and those
    /// answered 429 for it (`throttled`).
    pub caller_identification_failures: IntCounterVec,
    /// Database sessions (SPEC section 9).
    pub db: DbMetrics,
}

pub struct DbMetrics {
    pub sessions: IntCounterVec,
    pub active_sessions: IntGaugeVec,
    pub session_duration: HistogramVec,
    pub statements: IntCounterVec,
    pub statement_duration: HistogramVec,
}

/// The statement verbs counted by name; any other is `OTHER`, so the
/// label stays bounded whatever the clients send.
pub const DB_COMMANDS: [&str; 22] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "COPY",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET",
    "SHOW",
    "CREATE",
    "ALTER",
    "DROP",
    "TRUNCATE",
    "LISTEN",
    "NOTIFY",
    "UNLISTEN",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "FETCH",
];

impl DbMetrics {
    fn new(registry: &Registry) -> Result<DbMetrics, prometheus::Error> {
        let sessions = IntCounterVec::new(
            Opts::new(
                "sealgate_db_sessions_total",
                "Database sessions ended, by data source, caller and result (ok, or the error code that refused or ended it).",
            ),
            &["datasource", "caller", "result"],
        )?;
        let active_sessions = IntGaugeVec::new(
            Opts::new(
                "sealgate_db_active_sessions",
                "Database sessions open, by data source.",
            ),
            &["datasource"],
        )?;
        let session_duration = HistogramVec::new(
            HistogramOpts::new(
                "sealgate_db_session_duration_seconds",
                "How long database sessions lasted, by data source.",
            )
            .buckets(vec![
                0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0,
            ]),
            &["datasource"],
        )?;
        let statements = IntCounterVec::new(
            Opts::new(
                "sealgate_db_statements_total",
                "Statements completed, by data source and command (the verb of the server's completion tag, or OTHER).",
            ),
            &["datasource", "command"],
        )?;
        let statement_duration = HistogramVec::new(
            HistogramOpts::new(
                "sealgate_db_statement_duration_seconds",
                "Time from a statement's arrival to its completion, by data source.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["datasource"],
        )?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(active_sessions.clone()))?;
        registry.register(Box::new(session_duration.clone()))?;
        registry.register(Box::new(statements.clone()))?;
        registry.register(Box::new(statement_duration.clone()))?;
        Ok(DbMetrics {
            sessions,
            active_sessions,
            session_duration,
            statements,
            statement_duration,
        })
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "sealgate_requests_total",
                "Requests answered, by data source, caller and HTTP status sent.",
            ),
            &["datasource", "caller", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sealgate_request_duration_seconds",
                "Time from request head to the end of the response, by data source.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["datasource"],
        )?;
        let active_requests = IntGauge::new("sealgate_active_requests", "Requests in progress.")?;
        let credential_open_failures = IntCounterVec::new(
            Opts::new(
                "sealgate_credential_open_failures_total",
                "Sealed credentials that did not open: at reload, and for every request refused because of it.",
            ),
            &["datasource"],
        )?;
        let credential_refreshes = IntCounterVec::new(
            Opts::new(
                "sealgate_credential_refreshes_total",
                "Access token fetches, by result: ok, refused (the endpoint said no), http_error, invalid (an answer that is no token), unreachable, egress_denied.",
            ),
            &["datasource", "result"],
        )?;
        let credential_expiry = GaugeVec::new(
            Opts::new(
                "sealgate_credential_expiry_timestamp_seconds",
                "When the data source's credential stops working (Unix seconds): its access token's expiry, or its expires_at.",
            ),
            &["datasource"],
        )?;
        let caller_grant_expiry = GaugeVec::new(
            Opts::new(
                "sealgate_caller_grant_expiry_timestamp_seconds",
                "When the caller's grant of the data source ends (Unix seconds): its not_after.",
            ),
            &["caller", "datasource"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "sealgate_config_reloads_total",
                "Configuration reloads (SIGHUP), by result: ok or error.",
            ),
            &["result"],
        )?;
        let egress_denied = IntCounterVec::new(
            Opts::new(
                "sealgate_egress_denied_total",
                "Requests refused by the egress policy, by data source and reason (no_allow_entry, mixed_answers, or the blocked range).",
            ),
            &["datasource", "reason"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "sealgate_upstream_errors_total",
                "Failed attempts to reach or use an upstream, by data source and kind (resolve, bind, connect, tls, timeout, protocol).",
            ),
            &["datasource", "kind"],
        )?;
        let downstream_closed = IntCounterVec::new(
            Opts::new(
                "sealgate_downstream_closed_total",
                "Caller connections sealgate closed to protect itself, by reason (head_timeout: no complete request head in time, idle keep-alive connections included; tls_handshake_timeout; idle_timeout; connection_limit).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(downstream_closed.clone()))?;
        let downstream_closed =
            CloseReason::ALL.map(|reason| downstream_closed.with_label_values(&[reason.label()]));
        let request_bytes = IntCounterVec::new(
            Opts::new(
                "sealgate_request_bytes_total",
                "Request body bytes received from callers, by data source.",
            ),
            &["datasource"],
        )?;
        let response_bytes = IntCounterVec::new(
            Opts::new(
                "sealgate_response_bytes_total",
                "Response body bytes sent to callers, by data source.",
            ),
            &["datasource"],
        )?;
        let audit_dropped = IntCounter::new(
            "sealgate_audit_dropped_total",
            "Audit records dropped because the audit output could not keep up ([audit] on_full = \"drop\").",
        )?;
        let tls_cert_expiry = GaugeVec::new(
            Opts::new(
                "sealgate_tls_cert_expiry_timestamp_seconds",
                "When the certificate a TLS listener presents expires (Unix time), by listener address.",
            ),
            &["listener"],
        )?;
        let secrets_scrubbed = IntCounterVec::new(
            Opts::new(
                "sealgate_secrets_scrubbed_total",
                "Places a data source echoed its injected secret and sealgate removed it before the caller saw it, by data source and where (header: a response head's reason phrase, header names and values, trailers).",
            ),
            &["datasource", "where"],
        )?;
        let caller_identification_failures = IntCounterVec::new(
            Opts::new(
                "sealgate_caller_identification_failures_total",
                "Requests whose caller could not be identified, by outcome: refused (401) or throttled (429, after repeated failures from the same peer).",
            ),
            &["outcome"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "sealgate_build_info",
                "Always 1; the version label says which sealgate is running.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(request_bytes.clone()))?;
        registry.register(Box::new(response_bytes.clone()))?;
        registry.register(Box::new(audit_dropped.clone()))?;
        registry.register(Box::new(tls_cert_expiry.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(secrets_scrubbed.clone()))?;
        registry.register(Box::new(caller_identification_failures.clone()))?;
        registry.register(Box::new(egress_denied.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(active_requests.clone()))?;
        registry.register(Box::new(credential_open_failures.clone()))?;
        registry.register(Box::new(credential_refreshes.clone()))?;
        registry.register(Box::new(credential_expiry.clone()))?;
        registry.register(Box::new(caller_grant_expiry.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        let no_datasource =
            DataSourceSeries::of(&duration, &request_bytes, &response_bytes, NO_DATASOURCE);
        let db = DbMetrics::new(&registry)?;
        Ok(Metrics {
            db,
            registry,
            requests,
            duration,
            active_requests,
            credential_open_failures,
            credential_refreshes,
            credential_expiry,
            caller_grant_expiry,
            config_reloads,
            egress_denied,
            upstream_errors,
            downstream_closed,
            request_bytes,
            response_bytes,
            no_datasource,
            audit_dropped,
            tls_cert_expiry,
            secrets_scrubbed,
            caller_identification_failures,
        })
    }

    pub fn datasource_series(&self, datasource: &str) -> DataSourceSeries {
        DataSourceSeries::of(
            &self.duration,
            &self.request_bytes,
            &self.response_bytes,
            datasource,
        )
    }

    pub fn count_upstream_error(&self, datasource: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[datasource, kind])
            .inc();
    }

    /// The counter of connections closed for `reason`.
    pub fn downstream_closed(&self, reason: CloseReason) -> &IntCounter {
        &self.downstream_closed[reason as usize]
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec cannot fail on I/O; a failure here would only
        // come from malformed metric families, which `new` rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair lands in its own series, whether kept at hand or not.
    #[test]
    fn answers_are_counted_by_caller_and_status_past_the_pairs_kept() {
        let m = Metrics::new().unwrap();
        let pay = m.datasource_series("pay");
        let callers: Vec<String> = (0..ANSWERED_KEPT + 4).map(|i| format!("app{i}")).collect();
        for _ in 0..3 {
            for caller in &callers {
                pay.count_answer(&m.requests, caller, 200);
            }
            pay.count_answer(&m.requests, "app0", 502);
            m.no_datasource.count_answer(&m.requests, "app0", 404);
        }
        pay.count_answer(&m.requests, "app0", 0);
        let count = |labels: [&str; 3]| m.requests.with_label_values(&labels).get();
        for caller in &callers {
            assert_eq!(count(["pay", caller, "200"]), 3, "{caller}");
        }
        assert_eq!(count(["pay", "app0", "502"]), 3);
        assert_eq!(count(["-", "app0", "404"]), 3);
        assert_eq!(count(["pay", "app0", "0"]), 1);
        assert_eq!(count(["pay", "app0", "404"]), 0);
    }

    #[test]
    fn exposes_counters_with_their_labels() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["pay", "local", "200"]).inc();
        m.duration.with_label_values(&["pay"]).observe(0.02);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(
                "sealgate_requests_total{caller=\"local\",code=\"200\",datasource=\"pay\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "sealgate_request_duration_seconds_bucket{datasource=\"pay\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("sealgate_active_requests 0"), "{text}");
    }

    #[test]
    fn each_close_reason_has_its_own_counter() {
        let m = Metrics::new().unwrap();
        m.downstream_closed(CloseReason::TlsHandshakeTimeout).inc();
        let text = String::from_utf8(m.encode()).unwrap();
        for reason in CloseReason::ALL {
            let count = u8::from(reason == CloseReason::TlsHandshakeTimeout);
            let line = format!(
                "sealgate_downstream_closed_total{{reason=\"{}\"}} {count}",
                reason.label()
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }
}
