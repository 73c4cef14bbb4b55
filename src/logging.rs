//! Operational logs (not the audit trail) through tracing, to stderr.
//! pingora's `log` output is routed into the same subscriber.

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
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
