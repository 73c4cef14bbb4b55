//! AWS Signature Version 4 over every request of a data source (SPEC
//! section 11), with the official `aws-sigv4` crate: the app never holds
//! the secret access key. The caller's own signing headers are removed
//! first; other `X-Amz-*` headers pass and are signed. S3 streams bodies
//! (`UNSIGNED-PAYLOAD`); other services sign the body's SHA-256, so the
//! HTTP front reads bodies of at most 1 MiB first.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::header::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

use crate::echoes::Echoes;
use crate::secrets::Secret;

/// The headers a signature consists of: whatever the caller sent under
/// these names is removed before signing.
pub const SIGNING_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-security-token",
];

/// The most of a body read to sign its hash (services other than S3).
pub const MAX_SIGNED_BODY: usize = 1024 * 1024;
/// What pingora's retry buffer holds: a body read ahead up to this size is
/// sent on by pingora; a longer one sealgate sends itself.
pub const PINGORA_RETRY_BUFFER: usize = 64 * 1024;

pub struct Sigv4 {
    identity: Identity,
    pub region: String,
    pub service: String,
    pub has_session_token: bool,
}

impl std::fmt::Debug for Sigv4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sigv4")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// What a request's body is signed as.
pub enum Payload<'a> {
    /// S3: the body streams, unsigned.
    Unsigned,
    /// The whole body (at most `MAX_SIGNED_BODY`).
    Whole(&'a [u8]),
}

impl Sigv4 {
    pub fn new(
        access_key_id: &Secret,
        secret_access_key: &Secret,
        session_token: Option<&Secret>,
        region: &str,
        service: &str,
    ) -> Sigv4 {
        // `Credentials` keeps the keys in zeroizing memory.
        let credentials = Credentials::new(
            access_key_id.expose(),
            secret_access_key.expose(),
            session_token.map(|t| t.expose().to_string()),
            None,
            "sealgate",
        );
        Sigv4 {
            identity: credentials.into(),
            region: region.to_string(),
            service: service.to_string(),
            has_session_token: session_token.is_some(),
        }
    }

    /// S3 streams bodies unsigned; every other service signs the body.
    pub fn streams(&self) -> bool {
        self.service == "s3"
    }

    /// Signs `req` as it will be sent to `authority` and returns the forms
    /// of its signature for redaction: the caller's signing
    /// headers removed, then `Authorization`, `X-Amz-Date`,
    /// `X-Amz-Content-Sha256` (and `X-Amz-Security-Token`) set. Signed:
    /// `host`, `content-type`, `content-md5` and every `x-amz-*` header.
    pub fn sign(
        &self,
        req: &mut RequestHeader,
        scheme: &str,
        authority: &str,
        payload: Payload<'_>,
    ) -> Result<Echoes, String> {
        for name in SIGNING_HEADERS {
            req.remove_header(name);
        }
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{scheme}://{authority}{path}");
        // Borrowed from the head: the signing instructions come back owned,
        // so the head is free to change once they do.
        let signed = req
            .headers
            .iter()
            .filter(|(name, _)| {
                let n = name.as_str();
                n == "host" || n == "content-type" || n == "content-md5" || n.starts_with("x-amz-")
            })
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let body = match payload {
            Payload::Unsigned => SignableBody::UnsignedPayload,
            Payload::Whole(bytes) => SignableBody::Bytes(bytes),
        };
        let request = SignableRequest::new(req.method.as_str(), url, signed, body)
            .map_err(|e| format!("the request cannot be signed: {e}"))?;
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        if self.streams() {
            // S3 signs the path as sent: encoded once, never normalised
            // (a key may hold `//` or `..`), as AWS's SDK signs it.
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        }
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(&self.service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| format!("signing parameters: {e}"))?
            .into();
        let (instructions, signature) = sign(request, &params)
            .map_err(|e| format!("the request cannot be signed: {e}"))?
            .into_parts();
        for (name, value) in instructions.headers() {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            let mut value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            value.set_sensitive(true);
            req.insert_header(name, value).map_err(|e| e.to_string())?;
        }
        // This request's signature is good for 15 minutes of replay: an
        // upstream that quotes it back has it redacted like a key (the rest
        // of `Authorization` is public, but for the access key id, which
        // the credential's own forms cover).
        Ok(Echoes::of(&[signature.as_bytes()]))
    }
}
