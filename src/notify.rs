//! Service-manager notifications (systemd `Type=notify`): ready once the
//! listeners accept, reloading/ready around SIGHUP, stopping on drain. A
//! no-op when `$NOTIFY_SOCKET` is unset (containers, the demo, tests).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// systemd 253 and newer require the monotonic time with RELOADING=1.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
