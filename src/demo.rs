//! `sealgate demo`: a built-in echo upstream and sealgate in front of it,
//! all on loopback, from a generated config. Needs no files and no network.
//!
//! ```text
//! sealgate demo
//! curl -s http://127.0.0.1:6180/echo/hello?x=1
//! ```

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use std::os::unix::fs::PermissionsExt;

use zeroize::Zeroizing;

use crate::config;
use crate::secrets::{self, Keyring, Secret};
use crate::server::{serve, StartError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: generated config is invalid: {0}")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("demo: {0}")]
    Seal(#[from] secrets::SealError),
    #[error("demo: {0}")]
    Keys(#[from] secrets::KeyringError),
}

pub fn run() -> Result<(), DemoError> {
    let echo = start_echo_upstream()?;
    let proxy = free_port(6180)?;
    let admin = free_port(9180)?;
    // A throwaway key and the demo's egress policy, on disk only for as
    // long as it takes to load them.
    let key_dir = tempfile::tempdir()?;
    let key_path = key_dir.path().join("demo.key");
    std::fs::write(&key_path, secrets::new_master_key()?.as_bytes())?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    let salt = secrets::new_salt()?;
    let keyring = Keyring::load(key_dir.path(), "demo", &salt)?;
    let cluster = crate::demo_postgres::start(&keyring);
    let mut destinations = vec![echo.to_string()];
    let (postgres_section, postgres_help, postgres_line) = match &cluster {
        Ok(cluster) => {
            destinations.push(format!("127.0.0.1:{}", cluster.port));
            let listen = free_port(6432)?;
            (
                format!("[postgres]\nlisten = [\"127.0.0.1:{listen}\"]\n{}", cluster.datasource),
                format!(
                    "\x20 psql \"host=127.0.0.1 port={listen} dbname=pgdemo user=app\" -c 'SELECT current_user'\n\
                     \x20     sealgate logs in to the throwaway PostgreSQL as demo_app with a sealed password\n\
                     \x20     (SCRAM); psql sends none\n"
                ),
                format!(
                    "\x20 postgres       127.0.0.1:{listen}  (data source \"pgdemo\": a throwaway cluster on 127.0.0.1:{})\n",
                    cluster.port
                ),
            )
        }
        Err(why) => (
            String::new(),
            String::new(),
            format!("\x20 (the PostgreSQL part is skipped: {why})\n"),
        ),
    };
    let allowed = destinations
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        key_dir.path().join("demo-policy.toml"),
        format!("[egress]\nallow = [{allowed}]\nallow_private = [{allowed}]\n"),
    )?;
    let token = Secret::new(Zeroizing::new(format!(
        "demo-{}",
        &secrets::new_salt()?[..12]
    )))
    .map_err(|e| DemoError::Io(std::io::Error::other(e)))?;
    let sealed = keyring.seal("echo", "token", &token)?;
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:{proxy}\"]\nthreads = 1\ngrace_period_s = 1\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [audit]\noutput = \"stdout\"\n\
         [keys]\ndir = \"{dir}\"\nprimary = \"demo\"\nsalt = \"{salt}\"\n\
         [policy]\ndir = \"{dir}\"\n\
         [datasources.echo]\nurl = \"http://{echo}/\"\ntimeout_ms = 5000\n\
         credential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n\
         {postgres_section}",
        dir = key_dir.path().display()
    );
    let config = config::parse(Path::new("(demo)"), &text)?;
    drop(key_dir);
    eprintln!(
        "\nsealgate demo: everything runs on loopback; nothing leaves this machine.\n\n\
         \x20 echo upstream  http://{echo}  (answers with what it received)\n\
         \x20 sealgate       http://127.0.0.1:{proxy}  (data source \"echo\", bearer credential sealed under a throwaway key)\n\
         \x20 admin          http://127.0.0.1:{admin}\n\
         {postgres_line}\n\
         Try, in another terminal:\n\
         \x20 curl -s 'http://127.0.0.1:{proxy}/echo/hello?x=1'\n\
         \x20     the upstream echoes the \"authorization: Bearer demo-...\" sealgate injected, path\n\
         \x20     /hello, your query kept, Host set to the upstream; the token it echoes shows as\n\
         \x20     \"Bearer *****************\": sealgate overwrites it in response bodies too, so the\n\
         \x20     app never holds it\n\
         \x20 curl -s -H 'Authorization: Bearer mine' http://127.0.0.1:{proxy}/echo/x\n\
         \x20     yours is replaced, never forwarded\n\
         \x20 curl -s http://127.0.0.1:{admin}/v1/datasources\n\
         \x20     the token shows as \"Encrypted on the server side\"\n\
         \x20 curl -s http://127.0.0.1:{proxy}/nope/x            404 unknown_datasource\n\
         \x20 curl -s 'http://127.0.0.1:{proxy}/echo/%2e%2e/etc'  400 bad_request\n\
         \x20 curl -s http://127.0.0.1:{admin}/metrics | grep ^sealgate_\n\
         {postgres_help}\n\
         Audit records follow on stdout, one JSON line per request. Ctrl-C stops.\n"
    );
    serve(config)?;
    Ok(())
}

/// The preferred port when free (so the printed commands are the usual
/// ones), any free port otherwise.
fn free_port(preferred: u16) -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, preferred))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(listener.local_addr()?.port())
}

fn start_echo_upstream() -> std::io::Result<SocketAddr> {
    let std_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("demo-echo".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service_fn(echo))
                            .await;
                    });
                }
            });
        })?;
    Ok(addr)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut body_bytes = 0usize;
    let mut body = body;
    while let Some(Ok(frame)) = body.frame().await {
        body_bytes += frame.data_ref().map_or(0, |d| d.len());
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let report = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{report:#}\n"))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
