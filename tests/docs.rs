//! The README says what this version does: every error code sealgate
//! answers with (SPEC section 4) is documented, and nothing already built
//! is announced as coming.

#[test]
fn the_readme_documents_every_error_code_and_no_finished_work_as_coming() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for code in [
        "bad_request",
        "caller_unauthenticated",
        "caller_forbidden",
        "egress_denied",
        "unknown_datasource",
        "method_not_allowed",
        "caller_throttled",
        "upstream_unreachable",
        "upstream_tls",
        "credential_unavailable",
        "upstream_timeout",
        "upstream_auth",
        "tls_required",
        "too_many_connections",
        "shutting_down",
        "body_too_large",
    ] {
        assert!(
            readme.contains(&format!("`{code}`")),
            "{code} is not in the README"
        );
    }
    let coming = readme
        .split("Coming next:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_default();
    for built in [
        "issue",
        "TLS handshake",
        "metrics, audit and packaging",
        "performance",
        "PostgreSQL",
        "MySQL",
        "sections 8",
        "sections 10",
        "sections 11",
        "SigV4",
        "OAuth2",
    ] {
        assert!(
            !coming.contains(built),
            "`{built}` is announced as coming: {coming}"
        );
    }
}
