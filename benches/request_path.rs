//! Per-request costs of sealgate's own work, apart from proxying (route,
//! policy decision, credential injection and redaction, audit encoding):
//! `cargo bench --bench request_path`.
//!
//! Injection is measured as "clone a request head, then inject" against
//! "clone a request head" alone; the difference is what a credential adds.

use std::hint::black_box;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::{RequestHeader, ResponseHeader};
use sealgate::audit::{self, AuditRecord, Decision};
use sealgate::credentials::Credential;
use sealgate::egress::{parse_entry, EgressPolicy, Rule};
use sealgate::http::route;
use sealgate::secrets::{self, Keyring, Secret};
use sealgate::upstream::UpstreamHost;
use zeroize::Zeroizing;

fn secret(s: &str) -> Secret {
    Secret::new(Zeroizing::new(s.to_string())).expect("valid secret")
}

fn typical_request() -> RequestHeader {
    let mut req =
        RequestHeader::build("GET", b"/payments/v1/charges/ch_123?limit=10", None).expect("head");
    for (k, v) in [
        ("host", "127.0.0.1:6180"),
        ("user-agent", "billing-app/2.3"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
        ("x-request-id", "4f1c2a9e"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("content-type", "application/json"),
        ("authorization", "Bearer caller-supplied"),
    ] {
        req.append_header(k, v).expect("header");
    }
    req
}

fn typical_response() -> ResponseHeader {
    let mut resp = ResponseHeader::build(200, None).expect("head");
    for (k, v) in [
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("date", "Sun, 22 Nov 2026 20:00:00 GMT"),
        ("cache-control", "no-store"),
        ("x-request-id", "4f1c2a9e"),
        ("strict-transport-security", "max-age=63072000"),
        ("vary", "accept-encoding"),
        (
            "link",
            "<https://api.example.com/v1/charges?page=2>; rel=\"next\"",
        ),
    ] {
        resp.append_header(k, v).expect("header");
    }
    resp
}

/// 1,000 allow entries: 400 hosts, 300 wildcards, 300 CIDRs of mixed
/// lengths and families, some with ports.
fn large_policy() -> EgressPolicy {
    let mut policy = EgressPolicy::default();
    let mut add = |entry: String| {
        let (target, ports) = parse_entry(&entry).expect("entry");
        let rule = Arc::new(Rule::new("bench.toml:1", &entry));
        policy.allow.add(target, ports, rule);
    };
    for i in 0..400 {
        add(format!("api{i}.customer{}.example.com:443", i % 50));
    }
    for i in 0..300 {
        add(format!("*.tenant{i}.example.net"));
    }
    for i in 0..300u32 {
        match i % 3 {
            0 => add(format!("34.{}.0.0/16:5432", i % 256)),
            1 => add(format!("52.{}.{}.0/24", i % 256, (i * 7) % 256)),
            _ => add(format!("[2600:1f{:02x}::/32]:443", i % 256)),
        }
    }
    policy
}

/// An OAuth2 credential with its token fetched once, for real, from a
/// token endpoint on loopback: what every request between fetches uses.
fn minted_bearer(
    dir: &tempfile::TempDir,
    keyring: &Keyring,
    salt: &str,
) -> Arc<sealgate::oauth2::OAuth2> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    runtime.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let body = r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let sealed = keyring
        .seal("crm", "client_secret", &secret("bench-client-secret"))
        .expect("seal");
    let policy = dir.path().join("policies");
    std::fs::create_dir_all(&policy).expect("policy dir");
    std::fs::write(
        policy.join("p.toml"),
        "[egress]\nallow = [\"127.0.0.1\"]\nallow_private = [\"127.0.0.1/32\"]\n",
    )
    .expect("policy");
    let text = format!(
        "[keys]\ndir = \"{}\"\nprimary = \"k1\"\nsalt = \"{}\"\n[policy]\ndir = \"policies\"\n[audit]\noutput = \"audit.log\"\n\
         [datasources.crm]\nurl = \"http://127.0.0.1:1\"\n\
         credential = {{ kind = \"oauth2\", token_url = \"http://127.0.0.1:{port}/token\", client_id = \"bench\", client_secret = \"{sealed}\" }}\n",
        dir.path().display(),
        salt,
    );
    let config = sealgate::config::parse(&dir.path().join("sealgate.toml"), &text).expect("config");
    let metrics = sealgate::metrics::Metrics::new().expect("metrics");
    let audit = sealgate::audit::AuditLog::open(
        &config.audit.output,
        config.audit.on_full,
        metrics.audit_dropped.clone(),
        config.audit.chain.clone(),
    )
    .expect("audit");
    let shared = sealgate::state::Shared::new(config, metrics, audit);
    let config = shared.config.load_full();
    let ds = config.datasources.get("crm").expect("crm").clone();
    let client = ds
        .credential
        .as_ref()
        .and_then(|c| c.ready())
        .and_then(|c| c.minted())
        .expect("an oauth2 credential")
        .clone();
    runtime
        .block_on(client.token(&shared, &config, &ds))
        .expect("a token fetched");
    client
}

fn bench(c: &mut Criterion) {
    let policy = large_policy();
    let resolved = [SocketAddr::from(([93, 184, 216, 34], 443))];
    for (what, host, port) in [
        (
            "an exact host",
            UpstreamHost::Name("api399.customer49.example.com".into()),
            443,
        ),
        (
            "a wildcard",
            UpstreamHost::Name("db.eu.tenant299.example.net".into()),
            443,
        ),
        (
            "a CIDR",
            UpstreamHost::Ip("52.98.174.9".parse().expect("ip")),
            443,
        ),
        (
            "no entry (worst case)",
            UpstreamHost::Name("a.b.c.d.unknown.example.org".into()),
            443,
        ),
    ] {
        c.bench_function(
            &format!("egress: decide {what} against 1,000 entries"),
            |b| {
                b.iter(|| {
                    let verdict = policy.destination(black_box(&host), port);
                    (verdict, policy.addresses(&host, black_box(&resolved)))
                })
            },
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k1.key");
    std::fs::write(&key, secrets::new_master_key().expect("key").as_bytes()).expect("write key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let salt = secrets::new_salt().expect("salt");
    let keyring = Keyring::load(dir.path(), "k1", &salt).expect("keyring");
    let token = secret("sk_live_51HxTestTokenValue0123456789abcdef");
    let envelope = keyring.seal("payments", "token", &token).expect("seal");

    c.bench_function("route: split and build the upstream target", |b| {
        b.iter(|| {
            let r = route::split(black_box("/payments/v1/charges/ch_123")).expect("route");
            route::upstream_target("/api", r.rest, Some("limit=10"))
        })
    });
    c.bench_function("secrets: open an envelope", |b| {
        b.iter(|| keyring.open(black_box("payments"), "token", black_box(&envelope), &[]))
    });

    let bearer = Credential::bearer(&token).expect("bearer");
    let head = typical_request();
    c.bench_function("credentials: clone a request head (baseline)", |b| {
        b.iter(|| black_box(head.clone()))
    });
    c.bench_function(
        "credentials: clone a request head and inject a bearer token",
        |b| {
            b.iter(|| {
                let mut req = head.clone();
                bearer.inject_header(&mut req).expect("inject");
                black_box(req)
            })
        },
    );
    let signer = sealgate::sigv4::Sigv4::new(
        &secret("AKIDEXAMPLE"),
        &secret("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        None,
        "eu-west-1",
        "s3",
    );
    c.bench_function(
        "credentials: clone a request head and sign it (SigV4, S3)",
        |b| {
            b.iter(|| {
                let mut req = head.clone();
                signer
                    .sign(
                        &mut req,
                        "https",
                        "bucket.s3.eu-west-1.amazonaws.com",
                        sealgate::sigv4::Payload::Unsigned,
                    )
                    .expect("sign");
                black_box(req)
            })
        },
    );
    let minted = minted_bearer(&dir, &keyring, &salt);
    c.bench_function(
        "credentials: clone a request head and inject a cached OAuth2 token",
        |b| {
            b.iter(|| {
                let mut req = head.clone();
                let token = minted.cached().expect("a token");
                req.insert_header(http::header::AUTHORIZATION, token.header.clone())
                    .expect("inject");
                black_box(req)
            })
        },
    );
    let query = Credential::query("api_key", &token).expect("query");
    c.bench_function("credentials: add a query credential", |b| {
        b.iter(|| query.query_with_credential(black_box(Some("limit=10&api_key=mine"))))
    });
    let resp = typical_response();
    c.bench_function("credentials: clone a response head (baseline)", |b| {
        b.iter(|| black_box(resp.clone()))
    });
    c.bench_function("credentials: clone a response head and redact it", |b| {
        b.iter(|| {
            let mut r = resp.clone();
            bearer.redact(&mut r).expect("redact");
            black_box(r)
        })
    });

    // What a data source that scrubs adds per 64 KiB response, in the
    // 16 KiB pieces pingora reads: a copy only where a piece holds a form.
    let scrubber_of = |token: &str| {
        let bearer_value = format!("Bearer {token}");
        let echoes = sealgate::echoes::Echoes::with_body_scrubber(&[
            token.as_bytes(),
            bearer_value.as_bytes(),
        ]);
        echoes.body_scrubber().expect("scrubber").clone()
    };
    let scrubber = scrubber_of("sk_live_51HxExampleTokenValue");
    // The peer benchmark's token is four letters: its forms are short.
    let peer_scrubber = scrubber_of("test");
    let text: Vec<u8> =
        br#"{"id":"ch_3MtwBwLkdIwHu7ix","object":"charge","amount":1099,"status":"succeeded"},"#
            .iter()
            .copied()
            .cycle()
            .take(64 * 1024)
            .collect();
    let body: Vec<bytes::Bytes> = text
        .chunks(16 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    // The peer benchmark's bodies are random bytes.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let random: Vec<bytes::Bytes> = random
        .chunks(16 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    for (what, pieces, scrubber) in [
        ("JSON", &body, &scrubber),
        ("random bytes", &random, &scrubber),
        ("random bytes, token \"test\",", &random, &peer_scrubber),
    ] {
        c.bench_function(&format!("scrub: 64 KiB of {what} in 16 KiB pieces"), |b| {
            b.iter(|| {
                let mut scrub = sealgate::scrub::BodyScrub::new(scrubber.clone());
                for (i, piece) in pieces.iter().enumerate() {
                    black_box(scrub.pass(Some(piece.clone()), i == pieces.len() - 1));
                }
            })
        });
    }

    c.bench_function("audit: encode one record", |b| {
        b.iter(|| {
            let record = AuditRecord {
                ts: std::time::SystemTime::now(),
                event: None,
                request_id: "0000000000a1b2c3",
                caller: Some("billing"),
                datasource: Some("payments"),
                method: "GET",
                path: Some(black_box("/payments/v1/charges/ch_123")),
                upstream: Some(SocketAddr::from(([52, 1, 2, 3], 443))),
                egress_ip: Some([203, 0, 113, 7].into()),
                region: Some("eu"),
                decision: Decision::Allow,
                reason: Some("allowed by policies/payments.toml:3 (api.stripe.com:443)"),
                status: Some(200),
                request_bytes: 0,
                response_bytes: 1024,
                duration: Duration::from_micros(1234),
                error: None,
                protocol: "http",
                credential: Some("datasource"),
                client_user: None,
                db_user: None,
                statements: None,
                statement: None,
            };
            black_box(audit::encode(&record))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
