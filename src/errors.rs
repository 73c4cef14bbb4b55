//! The errors sealgate answers with itself: a small fixed set of codes
//! (SPEC section 4), each with its status, used unchanged in the JSON body,
//! the audit record and metric labels.

use bytes::Bytes;
use pingora::{Error, ErrorSource, ErrorType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    CallerUnauthenticated,
    CallerForbidden,
    EgressDenied,
    UnknownDatasource,
    /// A method that makes the upstream reflect the request, credential
    /// included.
    MethodNotAllowed,
    /// A request target longer than `route::MAX_TARGET`.
    TargetTooLong,
    /// A body to be signed (SigV4, not S3) over the limit.
    BodyTooLarge,
    /// A response whose body sealgate must scrub came in an encoding it
    /// cannot read (the data source ignored `Accept-Encoding: identity`).
    UnscrubbableResponse,
    /// Too many failed identifications from one peer.
    CallerThrottled,
    UpstreamUnreachable,
    UpstreamTls,
    CredentialUnavailable,
    UpstreamTimeout,
    /// A database rejected the sealed credential.
    UpstreamAuth,
    /// A plain database connection from a non-loopback address.
    TlsRequired,
    /// A database front's `max_connections` reached.
    TooManyConnections,
    /// The drain ended, or a reload withdrew what a session stood on.
    ShuttingDown,
    /// A fault inside sealgate; never caused by the caller or upstream.
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::CallerUnauthenticated => 401,
            ErrorCode::CallerForbidden | ErrorCode::EgressDenied => 403,
            ErrorCode::UnknownDatasource => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::TargetTooLong => 414,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::CallerThrottled => 429,
            ErrorCode::TlsRequired => 403,
            ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTls
            | ErrorCode::UpstreamAuth
            | ErrorCode::UnscrubbableResponse => 502,
            ErrorCode::CredentialUnavailable
            | ErrorCode::TooManyConnections
            | ErrorCode::ShuttingDown => 503,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest | ErrorCode::TargetTooLong => "bad_request",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UnscrubbableResponse => "unscrubbable_response",
            ErrorCode::CallerThrottled => "caller_throttled",
            ErrorCode::CallerUnauthenticated => "caller_unauthenticated",
            ErrorCode::CallerForbidden => "caller_forbidden",
            ErrorCode::EgressDenied => "egress_denied",
            ErrorCode::UnknownDatasource => "unknown_datasource",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTls => "upstream_tls",
            ErrorCode::CredentialUnavailable => "credential_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::UpstreamAuth => "upstream_auth",
            ErrorCode::TlsRequired => "tls_required",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal_error",
        }
    }

    /// The SQLSTATE a database front answers this code with (SPEC
    /// section 9).
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::TargetTooLong
            | ErrorCode::MethodNotAllowed
            | ErrorCode::BodyTooLarge
            | ErrorCode::UnscrubbableResponse => "08P01",
            ErrorCode::TlsRequired | ErrorCode::CallerForbidden => "28000",
            ErrorCode::CallerUnauthenticated | ErrorCode::CallerThrottled => "28P01",
            ErrorCode::UnknownDatasource => "3D000",
            ErrorCode::EgressDenied
            | ErrorCode::UpstreamAuth
            | ErrorCode::CredentialUnavailable => "08004",
            ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTls
            | ErrorCode::UpstreamTimeout => "08001",
            ErrorCode::TooManyConnections => "53300",
            ErrorCode::ShuttingDown => "57P01",
            ErrorCode::Internal => "XX000",
        }
    }

    /// The error number and SQLSTATE of the MySQL front's ERR packet
    /// (SPEC section 10). Codes the SPEC's table does not list use the
    /// server's own number for the same condition (secure transport
    /// required, host blocked, internal error). An upstream that cannot be
    /// reached is 1429 (the server's "unable to connect to foreign data
    /// source"), not the SPEC's 2003: a server-sent error in the client
    /// range 2000-2999 during the handshake reaches a libmariadb user as
    /// "2027 Received malformed packet", its message lost.
    pub fn mysql(self) -> (u16, &'static str) {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::TargetTooLong
            | ErrorCode::MethodNotAllowed
            | ErrorCode::BodyTooLarge
            | ErrorCode::UnscrubbableResponse => (1156, "08S01"),
            ErrorCode::CallerUnauthenticated => (1045, "28000"),
            ErrorCode::CallerForbidden => (1044, "42000"),
            ErrorCode::UnknownDatasource => (1049, "3D000"),
            ErrorCode::EgressDenied => (1130, "08004"),
            ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTls
            | ErrorCode::UpstreamTimeout => (1429, "08001"),
            ErrorCode::UpstreamAuth | ErrorCode::CredentialUnavailable => (1045, "08004"),
            ErrorCode::TooManyConnections => (1040, "08004"),
            ErrorCode::ShuttingDown => (1053, "08S01"),
            ErrorCode::TlsRequired => (3159, "HY000"),
            ErrorCode::CallerThrottled => (1129, "HY000"),
            ErrorCode::Internal => (1815, "HY000"),
        }
    }

    /// Whether the request failed on the way out (after sealgate let it
    /// through) rather than being refused by sealgate.
    pub fn is_upstream(self) -> bool {
        matches!(
            self,
            ErrorCode::UpstreamUnreachable
                | ErrorCode::UpstreamTls
                | ErrorCode::UpstreamTimeout
                | ErrorCode::UpstreamAuth
                | ErrorCode::UnscrubbableResponse
        )
    }
}

/// An error response sealgate sends: the code plus a message for humans.
/// Messages never carry secrets, request bodies or query strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({ "error": self.code.as_str(), "message": self.message });
        Bytes::from(body.to_string())
    }
}

/// What went wrong in pingora, in the caller's terms. `None` means the
/// caller's connection is already gone, so there is nobody to answer.
pub fn classify(e: &Error) -> Option<Refusal> {
    use ErrorType::*;
    let etype = e.etype();
    match e.esource() {
        ErrorSource::Upstream => Some(match etype {
            ConnectTimedout | TLSHandshakeTimedout => {
                Refusal::new(ErrorCode::UpstreamTimeout, "connecting to the upstream timed out")
            }
            ReadTimedout | WriteTimedout => {
                Refusal::new(ErrorCode::UpstreamTimeout, "the upstream did not answer in time")
            }
            TLSHandshakeFailure | InvalidCert | TLSWantX509Lookup | HandshakeError => Refusal::new(
                ErrorCode::UpstreamTls,
                "TLS with the upstream failed: its certificate could not be verified or the handshake failed",
            ),
            ConnectRefused => Refusal::new(ErrorCode::UpstreamUnreachable, "the upstream refused the connection"),
            ConnectNoRoute => Refusal::new(ErrorCode::UpstreamUnreachable, "no route to the upstream"),
            InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => {
                Refusal::new(ErrorCode::UpstreamUnreachable, "the upstream sent an invalid response")
            }
            _ => Refusal::new(ErrorCode::UpstreamUnreachable, "the connection to the upstream failed"),
        }),
        ErrorSource::Downstream => match etype {
            ReadError | WriteError | ConnectionClosed => None,
            ReadTimedout => Some(Refusal::new(ErrorCode::BadRequest, "reading the request timed out")),
            _ => Some(Refusal::new(ErrorCode::BadRequest, "malformed request")),
        },
        ErrorSource::Internal | ErrorSource::Unset => match etype {
            HTTPStatus(400) => Some(Refusal::new(ErrorCode::BadRequest, "malformed request")),
            _ => Some(Refusal::new(ErrorCode::Internal, "internal error")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_spec_json() {
        let r = Refusal::new(ErrorCode::UnknownDatasource, "no data source \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "unknown_datasource", "message": "no data source \"x\""})
        );
    }

    #[test]
    fn upstream_errors_map_to_spec_codes() {
        let up = |t| classify(&Error::new_up(t)).map(|r| r.code);
        assert_eq!(
            up(ErrorType::ConnectRefused),
            Some(ErrorCode::UpstreamUnreachable)
        );
        assert_eq!(
            up(ErrorType::ConnectTimedout),
            Some(ErrorCode::UpstreamTimeout)
        );
        assert_eq!(
            up(ErrorType::ReadTimedout),
            Some(ErrorCode::UpstreamTimeout)
        );
        assert_eq!(
            up(ErrorType::TLSHandshakeFailure),
            Some(ErrorCode::UpstreamTls)
        );
        assert_eq!(
            classify(&Error::new_down(ErrorType::ConnectionClosed)),
            None
        );
    }
}
