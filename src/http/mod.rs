//! The HTTP(S) front: pingora's `ProxyHttp` glue (`proxy`) with its
//! routing, request hygiene and per-connection limits, and how its
//! listeners are assembled.

pub mod hygiene;
pub mod limits;
pub mod proxy;
pub mod route;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::proxy::HttpProxy;
use pingora::server::Server;

use crate::metrics::CloseReason;
use crate::server::StartError;
use crate::state::{Shared, TlsHandles};
use crate::tls::{uri_san, TlsIdentity};
use limits::{ConnectionCap, Handshakes, HeadDeadline};
use proxy::SealgateProxy;

/// The downstream limits every listener's HTTP app is wrapped in; the
/// connection permits are shared by all listeners.
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub permits: Arc<tokio::sync::Semaphore>,
}

pub type ProxyApp = ConnectionCap<HeadDeadline<HttpProxy<SealgateProxy>>>;

impl Limits {
    /// The HTTP app a listener serves. h2 connections idle longer than the
    /// idle timeout are closed (h1 ones by the header deadline).
    pub fn app(&self, server: &Server, shared: &Arc<Shared>) -> ProxyApp {
        let mut app = pingora::proxy::http_proxy(
            &server.configuration,
            SealgateProxy::new(shared.clone(), self.idle_timeout),
        );
        let mut options = HttpServerOptions::default();
        options.h2_idle_timeout = Some(self.idle_timeout);
        app.server_options = Some(options);
        let closed = |reason| shared.metrics.downstream_closed(reason).clone();
        ConnectionCap::new(
            HeadDeadline::new(app, self.header_timeout, closed(CloseReason::HeadTimeout)),
            self.permits.clone(),
            closed(CloseReason::ConnectionLimit),
        )
    }
}

/// pingora's rustls listener, with sealgate's swappable certificate and
/// client verifier and the identity callback; TLS 1.2 and 1.3 only.
pub fn tls_settings(
    handles: &TlsHandles,
    handshakes: Arc<Handshakes>,
) -> Result<TlsSettings, StartError> {
    let mut settings = TlsSettings::with_callbacks(Box::new(IdentityCallback { handshakes }))
        .map_err(|e| StartError::Tls(e.to_string()))?;
    settings.set_cert_resolver(handles.cert.clone());
    if let Some(client) = &handles.client {
        settings.set_client_cert_verifier(client.clone());
    }
    settings.enable_h2();
    Ok(settings)
}

/// Attaches the verified client certificate's identity to the connection,
/// where the proxy finds it for every request on it, and ends the
/// connection's handshake deadline.
pub struct IdentityCallback {
    pub handshakes: Arc<crate::http::limits::Handshakes>,
}

#[async_trait]
impl TlsAccept for IdentityCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        self.handshakes.finished();
        let der = tls.peer_certificate_der()?;
        let identity = uri_san(der).ok()?;
        Some(Arc::new(TlsIdentity(identity)))
    }
}
