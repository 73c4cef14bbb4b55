//! `[proxy] listen_unix`: a Unix socket whose callers are known by their
//! peer uid (`SO_PEERCRED`). It keeps other local users, and an SSRF inside
//! the app, away from the credentials better than a loopback port can.
//!
//! pingora has no peer-credential support, so sealgate accepts these
//! connections itself (tokio reads the credentials safely) and hands each
//! to the same HTTP app as the TCP listeners, with the peer uid in a
//! task-local that the proxy reads while it handles the connection.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

tokio::task_local! {
    static PEER_UID: u32;
}

/// The peer uid of the Unix-socket connection being handled, if it is one.
pub fn peer_uid() -> Option<u32> {
    PEER_UID.try_with(|uid| *uid).ok()
}

/// Binds the socket before anything is served (so a bad path fails `run` at
/// once), replacing a stale socket file but never any other kind of file.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // Owner and group only: the group is how app processes are let in.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub struct UnixListenerService<A> {
    app: Arc<A>,
    path: PathBuf,
    listener: std::sync::Mutex<Option<std::os::unix::net::UnixListener>>,
}

impl<A> UnixListenerService<A> {
    pub fn new(app: A, path: PathBuf, listener: std::os::unix::net::UnixListener) -> Self {
        UnixListenerService {
            app: Arc::new(app),
            path,
            listener: std::sync::Mutex::new(Some(listener)),
        }
    }
}

#[async_trait]
impl<A> BackgroundService for UnixListenerService<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.listener.lock().ok().and_then(|mut l| l.take());
        let Some(listener) = taken.and_then(|l| tokio::net::UnixListener::from_std(l).ok()) else {
            tracing::error!(path = %self.path.display(), "unix listener could not be started");
            return;
        };
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "unix socket accept failed");
                        continue;
                    }
                },
                // Draining: stop taking connections; those open finish.
                _ = shutdown.changed() => break,
            };
            let uid = match stream.peer_cred() {
                Ok(cred) => cred.uid(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the peer credentials of a unix socket connection");
                    continue;
                }
            };
            let app = self.app.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(PEER_UID.scope(uid, async move {
                let mut next: Option<pingora::protocols::Stream> =
                    Some(Box::new(Stream::from(stream)));
                while let Some(stream) = next {
                    next = app.process_new(stream, &shutdown).await;
                }
            }));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
