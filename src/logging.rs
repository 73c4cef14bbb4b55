//! Operational logs (not the audit trail) through tracing, to stderr.
//! pingora's `log` output is routed into the same subscriber, through a
//! bridge that cuts off whatever part of its messages may carry bytes from
//! the wire.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// pingora logs upstream request headers at debug and raw wire bytes at
/// trace; h2 and hyper log frames. Whatever `RUST_LOG` asks for, these stay
/// at info or quieter so an injected credential never reaches a log line.
const WIRE_LOGGING_TARGETS: [&str; 6] = [
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_pool",
    "h2",
    "hyper",
];

/// Starts operational logging: `RUST_LOG` when set, else the configured
/// level; text, or one JSON object per line.
pub fn init(settings: &LogSettings) {
    let requested = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let own: Vec<&str> = requested
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !WIRE_LOGGING_TARGETS.iter().any(|t| d.starts_with(t)))
        .collect();
    let base = if own.is_empty() {
        "info".to_string()
    } else {
        own.join(",")
    };
    let mut filter = EnvFilter::try_new(&base).unwrap_or_else(|e| {
        eprintln!("sealgate: RUST_LOG `{requested}` is not valid ({e}); logging at info");
        EnvFilter::new("info")
    });
    let cap = if filter
        .max_level_hint()
        .is_some_and(|l| l > LevelFilter::INFO)
    {
        LevelFilter::INFO
    } else {
        filter.max_level_hint().unwrap_or(LevelFilter::INFO)
    };
    for target in WIRE_LOGGING_TARGETS {
        if let Ok(d) = format!("{target}={cap}").parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    let installed = match settings.format {
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
    };
    if installed.is_ok() && log::set_boxed_logger(Box::new(WireSafeLog)).is_ok() {
        // `log`'s own level check comes first and costs nothing: the
        // debug and trace lines on pingora's request path stop there.
        log::set_max_level(tracing_log::AsLog::as_log(&LevelFilter::current()));
    }
}

/// Where pingora's messages start quoting the wire. Its errors print their
/// context after ` context: `, and the context of a parse error is the raw
/// head it could not parse (`buf: HTTP/1.1 200 OK\r\n...`): with an
/// upstream that echoes its request, the injected credential. A few warnings
/// quote a header value directly.
const WIRE_CARRIERS: [&str; 3] = [" context: ", "buf: ", "header value"];

/// What stands where a message was cut.
const WITHHELD: &str = " [details withheld: they may quote request or response bytes]";

/// The `log` records of pingora and the HTTP libraries, handed to tracing
/// with every part that may quote the wire cut off. sealgate's own events
/// never carry wire bytes and do not pass through here.
struct WireSafeLog;

impl log::Log for WireSafeLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        tracing_log::AsTrace::as_trace(&metadata.level()) <= LevelFilter::current()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let safe = wire_safe(&message);
        let cut = if safe.len() < message.len() {
            WITHHELD
        } else {
            ""
        };
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{safe}{cut}"))
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

/// `message` up to the first place it may start quoting the wire.
fn wire_safe(message: &str) -> &str {
    let end = WIRE_CARRIERS
        .iter()
        .filter_map(|carrier| message.find(carrier))
        .min()
        .unwrap_or(message.len());
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_messages_lose_what_may_quote_the_wire() {
        let parse_error = "Fail to proxy: Upstream InvalidHTTPHeader context: buf: HTTP/1.1 200 tok\r\n, status: 502";
        assert_eq!(
            wire_safe(parse_error),
            "Fail to proxy: Upstream InvalidHTTPHeader"
        );
        assert_eq!(
            wire_safe("invalid content-length header value tok"),
            "invalid content-length "
        );
        assert_eq!(
            wire_safe("Downstream ConnectionClosed, status: 0"),
            "Downstream ConnectionClosed, status: 0"
        );
    }
}
