//! AWS Signature Version 4 data sources end to end (SPEC section 11),
//! against a verifier no one here wrote: moto in server mode with request
//! authentication on, which recomputes every signature with botocore. The
//! app sends plain requests; sealgate signs them with keys only it holds.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper::Request;

/// moto, with authentication on after the three requests that create the
/// IAM user sealgate signs as.
struct Moto {
    port: u16,
    child: Child,
    access_key_id: String,
    secret_access_key: String,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (./dev.sh setup installs moto[server])");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let script = format!(
            "import boto3, json\n\
             iam = boto3.client('iam', endpoint_url='http://127.0.0.1:{port}', region_name='us-east-1',\n\
                 aws_access_key_id='setup', aws_secret_access_key='setup')\n\
             iam.create_user(UserName='sealgate')\n\
             key = iam.create_access_key(UserName='sealgate')['AccessKey']\n\
             iam.put_user_policy(UserName='sealgate', PolicyName='all', PolicyDocument=json.dumps(\n\
                 {{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}}]}}))\n\
             print(key['AccessKeyId'], key['SecretAccessKey'])\n"
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut keys = text.split_whitespace().map(str::to_string);
        Moto {
            port,
            child,
            access_key_id: keys.next().unwrap(),
            secret_access_key: keys.next().unwrap(),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fixture {
    moto: Moto,
    sg: Sealgate,
}

/// Data sources `s3` and `dynamodb` signing as moto's user, and
/// `s3_wrong` with a secret that is not its.
fn fixture(rust_log: &str) -> Fixture {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).unwrap();
    let mut toml = keys.toml("k1");
    for (name, service, secret) in [
        ("s3", "s3", moto.secret_access_key.as_str()),
        ("dynamodb", "dynamodb", moto.secret_access_key.as_str()),
        ("s3_wrong", "s3", "not-the-secret-access-key-0000000000000"),
    ] {
        let id = seal(&config, name, "access_key_id", &moto.access_key_id);
        let secret = seal(&config, name, "secret_access_key", secret);
        toml.push_str(&format!(
            "[datasources.{name}]\nurl = \"http://127.0.0.1:{}\"\ntimeout_ms = 60000\n\
             credential = {{ kind = \"aws_sigv4\", access_key_id = \"{id}\", secret_access_key = \"{secret}\", \
             region = \"us-east-1\", service = \"{service}\" }}\n",
            moto.port
        ));
    }
    let sg = Sealgate::start_logging(dir, &toml, rust_log);
    Fixture { moto, sg }
}

async fn send_to(
    sg: &Sealgate,
    mut req: Request<BoxBody>,
) -> (u16, hyper::HeaderMap, bytes::Bytes) {
    req.headers_mut()
        .insert("host", hyper::header::HeaderValue::from_static("sealgate"));
    let resp = send(sg.proxy, req).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_requests_are_signed_and_a_64_mib_upload_streams() {
    let f = tokio::task::spawn_blocking(|| fixture("info"))
        .await
        .unwrap();
    let put = |path: &str, body: Vec<u8>| {
        Request::put(format!("/s3{path}"))
            // The caller's own signing headers are replaced, not passed.
            .header("authorization", "AWS4-HMAC-SHA256 Credential=caller/forged")
            .header("x-amz-date", "20000101T000000Z")
            .header("x-amz-meta-note", "kept and signed")
            .body(full(body))
            .unwrap()
    };
    let (status, headers, body) = send_to(&f.sg, put("/bucket", Vec::new())).await;
    assert_eq!(
        status,
        200,
        "{headers:?} {} {}",
        String::from_utf8_lossy(&body),
        f.sg.stderr()
    );
    let object: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let before = f.sg.peak_rss_kib();
    let (status, _, body) = send_to(&f.sg, put("/bucket/big", object.clone())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let growth = f.sg.peak_rss_kib().saturating_sub(before);
    assert!(
        growth < 16 * 1024,
        "the upload streams: peak RSS grew {growth} KiB"
    );
    let get = Request::get("/s3/bucket/big").body(empty()).unwrap();
    let (status, headers, body) = send_to(&f.sg, get).await;
    assert_eq!(status, 200);
    assert!(body == object, "the object came back whole");
    assert_eq!(
        headers.get("x-amz-meta-note").map(|v| v.as_bytes()),
        Some(&b"kept and signed"[..])
    );
    // A key that needs percent-encoding is signed as S3 wants it.
    let (status, _, body) = send_to(&f.sg, put("/bucket/dir/a%20b.txt", b"odd".to_vec())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let get = Request::get("/s3/bucket/dir/a%20b.txt")
        .body(empty())
        .unwrap();
    let (status, _, body) = send_to(&f.sg, get).await;
    assert_eq!((status, &body[..]), (200, &b"odd"[..]));
    // A signature moto recomputes and finds wrong: the check is real.
    let get = Request::get("/s3_wrong/bucket/big").body(empty()).unwrap();
    let (status, _, body) = send_to(&f.sg, get).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("SignatureDoesNotMatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_service_signs_the_body_and_refuses_one_too_large_to_read() {
    let f = tokio::task::spawn_blocking(|| fixture("info"))
        .await
        .unwrap();
    let call = |target: &str, body: String| {
        Request::post("/dynamodb/")
            .header("x-amz-target", format!("DynamoDB_20120810.{target}"))
            .header("content-type", "application/x-amz-json-1.0")
            .body(full(body))
            .unwrap()
    };
    let create = serde_json::json!({
        "TableName": "notes",
        "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "id", "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST"
    });
    let (status, _, body) = send_to(&f.sg, call("CreateTable", create.to_string())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let item = serde_json::json!({"TableName": "notes", "Item": {"id": {"S": "1"}, "body": {"S": "x".repeat(30_000)}}});
    let (status, _, body) = send_to(&f.sg, call("PutItem", item.to_string())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = send_to(&f.sg, call("ListTables", "{}".into())).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("notes"));
    // Past the 64 KiB pingora can hold for it, sealgate sends the body on
    // a connection of its own.
    let large = serde_json::json!({"TableName": "notes", "Item": {"id": {"S": "2"}, "body": {"S": "y".repeat(300_000)}}});
    let (status, _, body) = send_to(&f.sg, call("PutItem", large.to_string())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let get = serde_json::json!({"TableName": "notes", "Key": {"id": {"S": "2"}}});
    let (status, headers, body) = send_to(&f.sg, call("GetItem", get.to_string())).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-sealgate-request-id"));
    let item: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        item["Item"]["body"]["S"].as_str().map(str::len),
        Some(300_000)
    );
    let huge = serde_json::json!({"TableName": "notes", "Item": {"id": {"S": "3"}, "body": {"S": "x".repeat(1_100_000)}}});
    let (status, _, body) = send_to(&f.sg, call("PutItem", huge.to_string())).await;
    assert_eq!(status, 413);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "body_too_large");
    // The request sealgate sent itself is audited like the others.
    let records = f.sg.audit(6);
    let direct = records
        .iter()
        .find(|r| {
            r["request_bytes"]
                .as_u64()
                .is_some_and(|n| (300_000..1_000_000).contains(&n))
        })
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(direct["status"], 200);
    assert_eq!(direct["upstream"], format!("127.0.0.1:{}", f.moto.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_access_key_appears_anywhere_at_trace_level() {
    let f = tokio::task::spawn_blocking(|| fixture("trace"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for path in ["/s3/bucket2", "/s3/bucket2/x", "/s3_wrong/bucket2/x"] {
        let req = Request::put(path).body(full("data")).unwrap();
        let (_, headers, body) = send_to(&f.sg, req).await;
        seen.extend_from_slice(format!("{headers:?}").as_bytes());
        seen.extend_from_slice(&body);
    }
    f.sg.assert_secrets_nowhere(&seen, std::slice::from_ref(&f.moto.secret_access_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_quoted_back_is_redacted_and_never_logged() {
    // An API that quotes the request's signature back in a header.
    let seen_by_upstream = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen_by_upstream.clone();
    let api = upstream(
        handler(move |req: Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                record.lock().unwrap().push(auth.clone());
                let signature = auth
                    .rsplit_once("Signature=")
                    .map_or("", |(_, s)| s)
                    .to_string();
                hyper::Response::builder()
                    .header("x-debug-signature", signature)
                    .body(full("ok"))
                    .unwrap()
            }
        }),
        None,
    )
    .await;
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsealgateKEY";
    let sg = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).unwrap();
        let id = seal(&config, "api", "access_key_id", "AKIDSEALGATETEST");
        let secret = seal(&config, "api", "secret_access_key", SECRET);
        let toml = format!(
            "{}\n[datasources.api]\nurl = \"http://{}\"\n\
             credential = {{ kind = \"aws_sigv4\", access_key_id = \"{id}\", secret_access_key = \"{secret}\", \
             region = \"eu-west-1\", service = \"execute-api\" }}\n",
            keys.toml("k1"),
            api.addr
        );
        Sealgate::start_logging(dir, &toml, "trace")
    })
    .await
    .unwrap();
    let req = Request::post("/api/items").body(full("{\"a\":1}")).unwrap();
    let (status, headers, body) = send_to(&sg, req).await;
    assert_eq!(status, 200);
    let authorization = seen_by_upstream.lock().unwrap()[0].clone();
    let signature = authorization
        .rsplit_once("Signature=")
        .unwrap()
        .1
        .to_string();
    assert_eq!(signature.len(), 64, "{authorization}");
    let quoted = headers.get("x-debug-signature").unwrap().to_str().unwrap();
    assert!(
        !quoted.contains(&signature),
        "the signature came back: {quoted}"
    );
    let (_, listing) =
        tokio::task::block_in_place(|| http_get_blocking(sg.admin, "/v1/datasources").unwrap());
    let all: Vec<serde_json::Value> = serde_json::from_str(&listing).unwrap();
    let credential = &all[0]["credential"];
    assert_eq!(credential["kind"], "aws_sigv4");
    assert_eq!(credential["access_key_id"], "Encrypted on the server side");
    assert_eq!(
        credential["secret_access_key"],
        "Encrypted on the server side"
    );
    assert_eq!(
        (
            credential["region"].as_str(),
            credential["service"].as_str()
        ),
        (Some("eu-west-1"), Some("execute-api"))
    );
    let mut seen = format!("{headers:?}").into_bytes();
    seen.extend_from_slice(&body);
    sg.assert_secrets_nowhere(&seen, &[SECRET.to_string(), signature]);
}
