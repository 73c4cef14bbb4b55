//! Whether a caller may use a data source, and with which credential:
//! decided here once for every front, so an HTTP request and a database
//! session are refused for the same reasons with the same words.

use crate::audit::Decision;
use crate::callers::Caller;
use crate::config::{CredentialSource, CredentialState, DataSource};
use crate::credentials::Credential;
use crate::errors::{ErrorCode, Refusal};
use crate::metrics::Metrics;

/// The credential a request or session will use, and whose it is.
pub struct Admitted<'a> {
    pub credential: Option<&'a Credential>,
    pub source: Option<CredentialSource>,
}

/// The caller's grant, then the credential it would use (its own, else the
/// data source's) having opened, then the egress policy's verdict on the
/// destination. Each refusal is counted where the SPEC says.
pub fn admit<'a>(
    metrics: &Metrics,
    caller: Option<&Caller>,
    ds: &'a DataSource,
) -> Result<Admitted<'a>, Refusal> {
    if let Some(caller) = caller {
        let access = caller.access(&ds.name, std::time::SystemTime::now());
        if let Some(why) = access.refusal(&caller.name, &ds.name) {
            return Err(Refusal::new(ErrorCode::CallerForbidden, why));
        }
    }
    let chosen = ds.credential_for(caller.map(|c| c.name.as_str()));
    let credential = match chosen {
        Some((CredentialState::Unavailable { .. }, _)) => {
            metrics
                .credential_open_failures
                .with_label_values(&[ds.name.as_str()])
                .inc();
            return Err(Refusal::new(
                ErrorCode::CredentialUnavailable,
                format!("the credential of data source \"{}\" cannot be opened with the keys loaded; nothing was sent", ds.name),
            ));
        }
        Some((CredentialState::Ready(credential), _)) => Some(credential),
        None => None,
    };
    if let Err(denial) = &ds.egress {
        metrics
            .egress_denied
            .with_label_values(&[ds.name.as_str(), denial.label])
            .inc();
        return Err(Refusal::new(ErrorCode::EgressDenied, denial.reason.clone()));
    }
    Ok(Admitted {
        credential,
        source: chosen.map(|(_, source)| source),
    })
}

/// The audit record's `decision` and `reason` (SPEC section 7): a refusal
/// sealgate made itself is a deny with its message; anything else that got
/// as far as a data source is an allow with the rule that admitted it (an
/// upstream that failed afterwards does not undo the decision).
pub fn verdict<'a>(
    refusal: Option<&'a Refusal>,
    datasource: Option<&'a DataSource>,
) -> (Decision, Option<&'a str>) {
    match refusal.filter(|r| !r.code.is_upstream()) {
        Some(refused) => (Decision::Deny, Some(refused.message.as_str())),
        None => (
            Decision::Allow,
            datasource
                .and_then(|d| d.egress.as_ref().ok())
                .map(|rule| rule.reason()),
        ),
    }
}
