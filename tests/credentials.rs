//! Sealed credentials end to end: sealing through the CLI, injection
//! through a real upstream, refusals at load, rotation, redaction, and a
//! scan of everything sealgate emits for the secrets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use hyper::{Request, Response};

const BEARER: &str = "tok-bearer-7f3a9c";
const PASSWORD: &str = "pw-basic-51d2e8";
const HEADER_KEY: &str = "key-header-0b44aa";
const QUERY_KEY: &str = "key query&91c7";

/// The data sources `check` sees here live at example.com.
fn with_example_policy(dir: &Path, toml: &str) -> String {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("example.toml"),
        "[egress]\nallow = [\"example.com:443\"]\n",
    )
    .unwrap();
    if toml.contains("[policy]") {
        toml.to_string()
    } else {
        format!("{toml}[policy]\ndir = \"policies\"\n")
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    keys: Keys,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        std::fs::write(dir.path().join("sealgate.toml"), keys.toml("k1")).unwrap();
        Fixture { dir, keys }
    }

    fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("sealgate.toml")
    }

    fn seal(&self, datasource: &str, field: &str, plaintext: &str) -> String {
        seal(&self.config(), datasource, field, plaintext)
    }

    /// One data source of every kind, all pointing at `upstream`.
    fn all_kinds(&self, upstream: std::net::SocketAddr) -> String {
        format!(
            "{keys}\n\
             [datasources.bearer]\nurl = \"http://{upstream}/b\"\n\
             credential = {{ kind = \"bearer\", token = \"{t}\" }}\n\
             [datasources.basic]\nurl = \"http://{upstream}/u\"\n\
             credential = {{ kind = \"basic\", username = \"svc\", password = \"{p}\" }}\n\
             [datasources.header]\nurl = \"http://{upstream}/h\"\n\
             credential = {{ kind = \"header\", name = \"X-API-Key\", value = \"{h}\" }}\n\
             [datasources.query]\nurl = \"http://{upstream}/q\"\n\
             credential = {{ kind = \"query\", name = \"api_key\", value = \"{q}\" }}\n",
            keys = self.keys.toml("k1"),
            t = self.seal("bearer", "token", BEARER),
            p = self.seal("basic", "password", PASSWORD),
            h = self.seal("header", "value", HEADER_KEY),
            q = self.seal("query", "value", QUERY_KEY),
        )
    }

    fn check(&self, toml: &str) -> (i32, String) {
        let toml = with_example_policy(self.dir.path(), toml);
        std::fs::write(self.config(), toml).unwrap();
        let (code, out, err) = check_config(self.config());
        (code, format!("{out}{err}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_is_injected_and_replaces_what_the_caller_sent() {
    let f = Fixture::new();
    let (up, seen) = recording_upstream().await;
    let toml = f.all_kinds(up.addr);
    let sg = Sealgate::start_in(f.dir, &toml);

    let send_with = |path: &'static str| {
        Request::get(path)
            .header("host", "x")
            .header("authorization", "Bearer caller-own")
            .header("x-api-key", "caller-own")
            .body(empty())
            .unwrap()
    };
    for path in [
        "/bearer/x",
        "/basic/x",
        "/header/x",
        "/query/x?a=1&api_key=caller-own&b=2",
    ] {
        assert_eq!(
            send(sg.proxy, send_with(path)).await.status(),
            200,
            "{path}"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0]["headers"]["authorization"],
        format!("Bearer {BEARER}")
    );
    assert_eq!(
        seen[1]["headers"]["authorization"],
        format!("Basic {}", STANDARD.encode(format!("svc:{PASSWORD}")))
    );
    assert_eq!(seen[2]["headers"]["x-api-key"], HEADER_KEY);
    assert!(
        seen[2]["headers"].get("authorization").is_none(),
        "caller's Authorization removed"
    );
    assert_eq!(seen[3]["target"], "/q/x?a=1&b=2&api_key=key%20query%2691c7");
    assert!(seen[3]["headers"].get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_echoed_in_response_headers_is_redacted() {
    let f = Fixture::new();
    let up = upstream(
        handler(|req: Request<hyper::body::Incoming>| async move {
            let auth = req.headers().get("authorization").cloned();
            let token = auth
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .trim_start_matches("Bearer ");
            Response::builder()
                .status(302)
                .header("location", format!("https://cb.example/?token={token}"))
                .header(
                    "www-authenticate",
                    format!("Bearer error=\"invalid\", token=\"{token}\""),
                )
                .header("link", "<https://cb.example/ok>")
                .body(empty())
                .unwrap()
        }),
        None,
    )
    .await;
    let toml = format!(
        "{}[datasources.echoing]\nurl = \"http://{}\"\ncredential = {{ kind = \"bearer\", token = \"{}\" }}\n",
        f.keys.toml("k1"),
        up.addr,
        f.seal("echoing", "token", BEARER)
    );
    let sg = Sealgate::start_in(f.dir, &toml);
    let resp = get(sg.proxy, "/echoing/x").await;
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "[redacted]");
    assert_eq!(resp.headers()["www-authenticate"], "[redacted]");
    assert_eq!(resp.headers()["link"], "<https://cb.example/ok>");
}

#[test]
fn moved_tampered_and_unknown_key_envelopes_each_fail_naming_source_and_field() {
    let f = Fixture::new();
    let pay = f.seal("pay", "token", BEARER);
    let ds = |name: &str, field: &str, value: &str| {
        let kind = if field == "token" {
            "bearer"
        } else {
            "header\", name = \"X-Key"
        };
        format!("[datasources.{name}]\nurl = \"https://example.com\"\ncredential = {{ kind = \"{kind}\", {field} = \"{value}\" }}\n")
    };
    let keys = f.keys.toml("k1");

    let (code, out) = f.check(&format!(
        "{keys}{}{}",
        ds("pay", "token", &pay),
        ds("crm", "token", &pay)
    ));
    assert_eq!(code, 1);
    assert!(out.contains(":10: datasources.crm.credential.token: sealed value was sealed for data source \"pay\", field \"token\""), "{out}");
    assert!(
        !out.contains("datasources.pay.credential"),
        "the original stays valid: {out}"
    );

    let (code, out) = f.check(&format!("{keys}{}", ds("pay", "value", &pay)));
    assert_eq!(code, 1);
    assert!(out.contains("datasources.pay.credential.value: sealed value was sealed for data source \"pay\", field \"token\""), "{out}");

    let (prefix, data) = pay.rsplit_once(':').unwrap();
    let mut blob = URL_SAFE_NO_PAD.decode(data).unwrap();
    blob[14] ^= 0x20;
    let tampered = format!("{prefix}:{}", URL_SAFE_NO_PAD.encode(blob));
    let (code, out) = f.check(&format!("{keys}{}", ds("pay", "token", &tampered)));
    assert_eq!(code, 1);
    assert!(
        out.contains(
            "datasources.pay.credential.token: sealed value does not open with key \"k1\""
        ),
        "{out}"
    );

    let unknown = pay.replacen("sealed:v1:k1:", "sealed:v1:k7:", 1);
    let (code, out) = f.check(&format!("{keys}{}", ds("pay", "token", &unknown)));
    assert_eq!(code, 1);
    assert!(out.contains("datasources.pay.credential.token: sealed value is sealed under key \"k7\", which is not in the key directory"), "{out}");

    let (code, out) = f.check(&format!("{keys}{}", ds("pay", "token", "hunter2")));
    assert_eq!(code, 1);
    assert!(
        out.contains("datasources.pay.credential.token: holds a plaintext secret"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2"),
        "the plaintext is not repeated back: {out}"
    );
}

/// Seals exactly as SPEC section 5 describes, without sealgate's code: the
/// format is a contract other tools may implement.
fn seal_per_spec(
    keys: &Keys,
    key_id: &str,
    datasource: &str,
    field: &str,
    plaintext: &[u8],
) -> String {
    let master_b64 = std::fs::read_to_string(keys.dir.join(format!("{key_id}.key"))).unwrap();
    let master = STANDARD.decode(master_b64.trim()).unwrap();
    let salt = STANDARD.decode(&keys.salt).unwrap();
    let mut data_key = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &master)
        .expand(b"sealgate v1 data key", &mut data_key)
        .unwrap();
    let nonce = [9u8; 12];
    let aad = format!("sealgate v1|{datasource}|{field}");
    let sealed = Aes256Gcm::new(&data_key.into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: aad.as_bytes(),
            },
        )
        .unwrap();
    format!(
        "sealed:v1:{key_id}:{}",
        URL_SAFE_NO_PAD.encode([&nonce[..], &sealed].concat())
    )
}

#[test]
fn envelopes_follow_the_spec_format_and_control_characters_are_refused() {
    let f = Fixture::new();
    let ds = |value: &str| {
        format!(
            "{}[datasources.pay]\nurl = \"https://example.com\"\ncredential = {{ kind = \"bearer\", token = \"{value}\" }}\n",
            f.keys.toml("k1")
        )
    };
    let (code, out) = f.check(&ds(&seal_per_spec(
        &f.keys,
        "k1",
        "pay",
        "token",
        b"independently-sealed",
    )));
    assert_eq!(code, 0, "{out}");
    let (code, out) = f.check(&ds(&seal_per_spec(
        &f.keys,
        "k1",
        "pay",
        "token",
        b"tok\r\nX-Injected: 1",
    )));
    assert_eq!(code, 1);
    assert!(out.contains("datasources.pay.credential.token: sealed value opened, but the secret contains control characters"), "{out}");

    // `seal` refuses them before they are ever sealed.
    let (code, _, err) = run_cli(
        &[
            "seal",
            "-c",
            f.config().to_str().unwrap(),
            "--datasource",
            "pay",
            "--field",
            "token",
        ],
        b"tok\nX-Injected: 1\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("control characters"), "{err}");
}

#[test]
fn key_files_open_to_others_and_short_salts_stop_sealgate_starting() {
    let f = Fixture::new();
    let key = f.keys.dir.join("k1.key");
    let sealed = f.seal("pay", "token", BEARER);
    let toml = |salt: &str| {
        format!(
            "[keys]\ndir = \"keys\"\nprimary = \"k1\"\nsalt = \"{salt}\"\n\
             [datasources.pay]\nurl = \"https://example.com\"\ncredential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n"
        )
    };
    for (mode, refused) in [(0o644, true), (0o660, true), (0o640, false), (0o600, false)] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, out) = f.check(&toml(&f.keys.salt));
        assert_eq!(code == 1, refused, "mode {mode:o}: {out}");
        if refused {
            assert!(
                out.contains(&format!(
                    "key file {} is readable or writable by others",
                    key.display()
                )),
                "{out}"
            );
        }
    }
    let (code, out) = f.check(&toml(&STANDARD.encode(b"fifteen bytes!!")));
    assert_eq!(code, 1);
    assert!(
        out.contains(":4: keys.salt: salt is 15 bytes; at least 16 are required"),
        "{out}"
    );

    // `run` refuses just as `check` does, before binding anything.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    std::fs::write(f.config(), toml(&f.keys.salt)).unwrap();
    let (code, _, err) = run_cli(&["run", "-c", f.config().to_str().unwrap()], b"");
    assert_eq!(code, 1);
    assert!(err.contains("readable or writable by others"), "{err}");
}

#[test]
fn keys_come_from_credentials_directory_when_dir_is_unset() {
    let f = Fixture::new();
    let sealed = f.seal("pay", "token", BEARER);
    let toml = format!(
        "[keys]\nprimary = \"k1\"\nsalt = \"{}\"\n[datasources.pay]\nurl = \"https://example.com\"\n\
         credential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n",
        f.keys.salt
    );
    std::fs::write(f.config(), with_example_policy(f.dir.path(), &toml)).unwrap();
    let check = |credentials_dir: Option<&Path>| {
        let mut cmd = std::process::Command::new(&*BIN);
        cmd.args(["check", "-c", f.config().to_str().unwrap()])
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(dir) = credentials_dir {
            cmd.env("CREDENTIALS_DIRECTORY", dir);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(None);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("keys.dir: missing: set it, or run under systemd with LoadCredential="),
        "{err}"
    );
    let (code, err) = check(Some(&f.keys.dir));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn keygen_writes_0600_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k1.key");
    assert_eq!(
        run_cli(&["keygen", "--out", out.to_str().unwrap()], b"").0,
        0
    );
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&out).unwrap();
    assert_eq!(
        STANDARD
            .decode(String::from_utf8_lossy(&before).trim())
            .unwrap()
            .len(),
        32
    );
    let (code, _, err) = run_cli(&["keygen", "--out", out.to_str().unwrap()], b"");
    assert_eq!(code, 1);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn reseal_moves_every_value_to_a_new_primary_keeping_comments() {
    let f = Fixture::new();
    let sealed = f.seal("pay", "token", BEARER);
    let own = f.seal(
        "pay",
        "caller_credentials.billing.token",
        "billing-own-token",
    );
    std::fs::create_dir_all(f.dir.path().join("policies")).unwrap();
    std::fs::write(
        f.dir.path().join("policies/callers.toml"),
        format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [\"pay\"]\n",
            sha256_hex("t")
        ),
    )
    .unwrap();
    let original = format!(
        "# sealgate for the billing app\n{}\n[datasources.pay]   # payments API\n\
         url = \"https://example.com\"\ncredential = {{ kind = \"bearer\", token = \"{sealed}\" }}  # rotated yearly\n\
         [datasources.pay.caller_credentials.billing]\nkind = \"bearer\"\ntoken = \"{own}\"  # its own\n",
        f.keys.toml("k2").replace("primary = \"k2\"", "primary = \"k2\"  # new key")
    );
    f.keys.add("k2");
    let (code, out) = f.check(&original);
    assert_eq!(code, 0, "old key ids stay readable before reseal: {out}");

    let cfg = f.config();
    let (code, _, err) = run_cli(&["reseal", "-c", cfg.to_str().unwrap()], b"");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resealed 2 values under key \"k2\""), "{err}");
    let rewritten = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(
        rewritten.matches("token = \"sealed:v1:k2:").count(),
        2,
        "{rewritten}"
    );
    for comment in [
        "# sealgate for the billing app",
        "# payments API",
        "# rotated yearly",
        "# new key",
        "# its own",
    ] {
        assert!(rewritten.contains(comment), "{comment} lost: {rewritten}");
    }
    assert_eq!(
        rewritten
            .replace(&sealed, "X")
            .replace(&own, "Y")
            .lines()
            .count(),
        with_example_policy(f.dir.path(), &original).lines().count()
    );

    // The old key can now go.
    std::fs::remove_file(f.keys.dir.join("k1.key")).unwrap();
    let (code, out) = f.check(&rewritten);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_shows_the_placeholder_never_the_secret() {
    let f = Fixture::new();
    let (up, _) = recording_upstream().await;
    let toml = f.all_kinds(up.addr);
    let sg = Sealgate::start_in(f.dir, &toml);
    let (code, body) = http_get_blocking(sg.admin, "/v1/datasources").unwrap();
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let basic = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "basic")
        .unwrap();
    assert_eq!(basic["credential"]["kind"], "basic");
    assert_eq!(basic["credential"]["username"], "svc");
    assert_eq!(
        basic["credential"]["password"],
        "Encrypted on the server side"
    );
    let query = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "query")
        .unwrap();
    assert_eq!(query["credential"]["value"], "Encrypted on the server side");
    assert!(!body.contains("sealed:"), "{body}");
}

/// Every path above, with everything sealgate emits captured and scanned
/// for the plaintexts, the key material and the envelopes.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_key_appears_in_anything_sealgate_emits() {
    let f = Fixture::new();
    let (up, _seen) = recording_upstream().await;
    let mut emitted = Vec::<String>::new();
    let mut record = |what: &str, text: String| emitted.push(format!("--- {what}\n{text}"));

    // seal and check, with their output.
    let cfg = f.config();
    for (ds, field, plain) in [("a", "token", BEARER), ("b", "value", HEADER_KEY)] {
        let (_, out, err) = run_cli(
            &[
                "seal",
                "-c",
                cfg.to_str().unwrap(),
                "--datasource",
                ds,
                "--field",
                field,
            ],
            format!("{plain}\n").as_bytes(),
        );
        record("seal stderr", err);
        assert!(out.starts_with("sealed:v1:k1:"));
    }
    let toml = f.all_kinds(up.addr);
    let envelopes: Vec<String> = toml
        .split('"')
        .filter(|s| s.starts_with("sealed:"))
        .map(str::to_string)
        .collect();
    assert_eq!(envelopes.len(), 4);
    let (_, out) = f.check(&toml);
    record("check", out);
    let (_, out) = f.check(&toml.replace(&envelopes[0], &envelopes[1]));
    record("check with a moved envelope", out);

    let key_b64 = std::fs::read_to_string(f.keys.dir.join("k1.key"))
        .unwrap()
        .trim()
        .to_string();
    let down = f.seal("down", "token", BEARER);
    let toml = format!(
        "{toml}[datasources.down]\nurl = \"http://127.0.0.1:{}\"\ncredential = {{ kind = \"bearer\", token = \"{down}\" }}\n",
        REFUSING_PORT
    );
    let keys_dir = f.keys.dir.clone();
    let sg = Sealgate::start_logging(f.dir, &toml, "trace");
    async fn fetch(sg: &Sealgate, path: &str) -> String {
        let resp = get(sg.proxy, path).await;
        let head = format!("{:?} {:?}", resp.status(), resp.headers());
        format!(
            "{head}\n{}",
            String::from_utf8_lossy(&body_bytes(resp).await)
        )
    }
    for path in [
        "/bearer/x?q=1",
        "/basic/x",
        "/header/x",
        "/query/x?api_key=mine",
        "/nope/x",
        "/bearer/%2e%2e/x",
        "/down/x",
    ] {
        record(path, fetch(&sg, path).await);
    }
    // 503: the key replaced under the same id, then SIGHUP.
    std::fs::remove_file(keys_dir.join("k1.key")).unwrap();
    std::fs::write(keys_dir.join("k1.key"), STANDARD.encode([7u8; 32])).unwrap();
    std::fs::set_permissions(
        keys_dir.join("k1.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    reload_and_wait(&sg, "ok", 1);
    let unavailable = fetch(&sg, "/bearer/x").await;
    assert!(
        unavailable.contains("credential_unavailable"),
        "{unavailable}"
    );
    record("/bearer/x after reload", unavailable);
    record("metrics", sg.metrics());
    record(
        "admin",
        http_get_blocking(sg.admin, "/v1/datasources").unwrap().1,
    );
    let audit_count = sg.audit(8).len();
    assert_eq!(audit_count, 8);
    record(
        "audit",
        std::fs::read_to_string(sg.dir.path().join("audit.log")).unwrap(),
    );
    record("stdout", sg.stdout());
    record("stderr", sg.stderr());
    assert!(
        sg.stderr().contains("TRACE") || sg.stderr().contains("DEBUG"),
        "trace logging was on"
    );

    let all = emitted.join("\n");
    let encoded_query = "key%20query%2691c7".to_string();
    let basic = STANDARD.encode(format!("svc:{PASSWORD}"));
    let mut needles: Vec<&str> = vec![
        BEARER,
        PASSWORD,
        HEADER_KEY,
        QUERY_KEY,
        &encoded_query,
        &basic,
        &key_b64,
    ];
    needles.extend(envelopes.iter().map(String::as_str));
    for needle in needles {
        assert!(
            !all.contains(needle),
            "`{needle}` leaked:\n{}",
            excerpt(&all, needle)
        );
    }
}

fn excerpt(all: &str, needle: &str) -> String {
    let at = all.find(needle).unwrap_or(0);
    let start = all[..at].rfind("--- ").unwrap_or(0);
    all[start..(at + needle.len() + 200).min(all.len())].to_string()
}
