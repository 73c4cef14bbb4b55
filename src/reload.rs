//! SIGHUP: re-read the config and swap it in whole. Requests in flight keep
//! the config they started with; a config that does not validate changes
//! nothing. A credential that no longer opens with the keys on disk (a key
//! removed or replaced) makes its data source refuse requests with 503
//! instead of keeping a credential the operator may have revoked.

use std::sync::Arc;

use crate::audit::Event;
use crate::config::{self, Config};
use crate::state::Shared;

pub fn reload(shared: &Shared) {
    let current = shared.config.load_full();
    let metrics = &shared.metrics;
    let loaded = config::load_for_reload(&current.file);
    // logrotate moves the audit file away and sends SIGHUP. The new file's
    // chain is under the primary key of the config that is in force.
    let chain_key = match &loaded {
        Ok((next, _)) => next.audit.chain.clone(),
        Err(_) => current.audit.chain.clone(),
    };
    shared.audit.reopen(chain_key);
    match loaded {
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("reload refused, running configuration unchanged: {e}");
            }
            metrics.config_reloads.with_label_values(&["error"]).inc();
            shared
                .audit
                .event(Event::Reload, "failed", &errors.to_string(), None);
        }
        Ok((mut next, unopened)) => {
            for (datasource, e) in &unopened {
                tracing::error!(
                    "data source \"{datasource}\" refuses requests until its credential opens: {e}"
                );
                metrics
                    .credential_open_failures
                    .with_label_values(&[datasource.as_str()])
                    .inc();
            }
            for problem in &next.egress_problems {
                tracing::warn!("requests to this data source will be refused: {problem}");
            }
            for setting in restart_only_changes(&current, &next) {
                tracing::warn!("{setting} changed; the new value takes effect at the next restart");
            }
            swap_tls(shared, &next);
            next.generation = current.generation + 1;
            shared.audit.event(
                Event::Reload,
                "ok",
                "configuration reloaded",
                Some(&next.key_ids),
            );
            let generation = next.generation;
            shared.config.store(Arc::new(next));
            shared.config_changes.send_replace(generation);
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            tracing::info!(file = %current.file.display(), "configuration reloaded");
        }
    }
}

/// New certificates and client CAs for connections accepted from now on;
/// established connections keep the ones they were accepted with.
fn swap_tls(shared: &Shared, next: &Config) {
    shared.record_expiries(next);
    if let (Some(handles), Some(tls)) = (&shared.tls, &next.proxy.tls) {
        handles.replace(&tls.cert, tls.client_verifier.as_ref(), "proxy.tls");
        shared.record_cert_expiry(tls);
    }
    for (handles, front, section) in [
        (&shared.postgres_tls, &next.postgres, "postgres.tls"),
        (&shared.mysql_tls, &next.mysql, "mysql.tls"),
    ] {
        if let (Some(handles), Some(tls)) = (handles, front.as_ref().and_then(|p| p.tls.as_ref())) {
            handles.replace(&tls.cert, tls.client_verifier.as_ref(), section);
        }
    }
}

/// A database front's listeners and limits, bound at start.
fn db_listeners(
    front: &Option<crate::config::DbFront>,
) -> Option<(Vec<std::net::SocketAddr>, Option<std::path::PathBuf>, bool)> {
    front
        .as_ref()
        .map(|p| (p.listen.clone(), p.listen_unix.clone(), p.tls.is_some()))
}

/// Settings bound at start (listeners, threads, timeouts, the audit sink).
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (&current.proxy, &next.proxy);
    let tls_listen = |c: &Config| c.proxy.tls.as_ref().map(|t| t.listen.clone());
    let handshake_timeout = |c: &Config| c.proxy.tls.as_ref().map(|t| t.handshake_timeout);
    [
        ("proxy.listen", a.listen != b.listen),
        ("proxy.listen_unix", a.listen_unix != b.listen_unix),
        ("proxy.threads", a.threads != b.threads),
        ("proxy.grace_period_s", a.grace_period != b.grace_period),
        (
            "proxy.header_timeout_s",
            a.header_timeout != b.header_timeout,
        ),
        ("proxy.idle_timeout_s", a.idle_timeout != b.idle_timeout),
        (
            "proxy.max_connections",
            a.max_connections != b.max_connections,
        ),
        ("proxy.tls.listen", tls_listen(current) != tls_listen(next)),
        (
            "proxy.tls.handshake_timeout_s",
            handshake_timeout(current) != handshake_timeout(next),
        ),
        ("admin.listen", current.admin.listen != next.admin.listen),
        (
            "postgres",
            db_listeners(&current.postgres) != db_listeners(&next.postgres),
        ),
        (
            "mysql",
            db_listeners(&current.mysql) != db_listeners(&next.mysql),
        ),
        ("audit.output", current.audit.output != next.audit.output),
        (
            "audit.chain",
            current.audit.chain.is_some() != next.audit.chain.is_some(),
        ),
        (
            "log",
            current.log.format != next.log.format || current.log.level != next.log.level,
        ),
    ]
    .into_iter()
    .filter_map(|(setting, changed)| changed.then_some(setting))
    .collect()
}
