//! The PostgreSQL front end to end: real clients (psql, tokio-postgres)
//! through sealgate to a real PostgreSQL server started by the test, over
//! TCP, the Unix socket and TLS, with every authentication method the
//! server can ask for.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::postgres::{PgServer, CLEARTEXT_USER, DATABASE, MD5_USER, SCRAM_USER};
use common::*;
use tokio_postgres::error::SqlState;

/// What a test's extra config is made with.
struct Setup<'a> {
    dir: &'a std::path::Path,
    config: &'a std::path::Path,
    ca: &'a TestCa,
    pg: &'a PgServer,
}

impl Setup<'_> {
    /// `[postgres.tls]` with a certificate for `localhost` from `ca`, and
    /// client certificates checked against the same CA.
    fn postgres_tls(&self) -> String {
        let (cert, key) = self.ca.issue(vec![dns("localhost")]);
        std::fs::write(self.dir.join("server.pem"), cert).unwrap();
        std::fs::write(self.dir.join("server-key.pem"), key).unwrap();
        self.ca.write_pem(&self.dir.join("callers-ca.pem"));
        "[postgres.tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"callers-ca.pem\"\n".into()
    }

    /// A policy file of callers, next to the loopback egress policy.
    fn callers(&self, policy: &str) {
        write_loopback_policy(self.dir);
        std::fs::write(self.dir.join("policies/callers.toml"), policy).unwrap();
    }
}

/// A PostgreSQL server, and sealgate in front of it with one data source
/// per login method: `orders` (SCRAM), `orders_md5`, `orders_cleartext`.
struct Fixture {
    pg: PgServer,
    sg: Sealgate,
    listen: SocketAddr,
    socket_dir: PathBuf,
}

impl Fixture {
    fn start(extra: &str) -> Fixture {
        Self::build("info", "", |_| extra.to_string())
    }

    /// `extra` gives more config (and may write policy files) once the
    /// keys, CA and server exist.
    fn build(rust_log: &str, postgres_keys: &str, extra: impl FnOnce(&Setup) -> String) -> Fixture {
        let ca = TestCa::new("pg test CA");
        let pg = PgServer::start(&ca, &[]);
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).unwrap();
        ca.write_pem(&dir.path().join("pg-ca.pem"));
        let mut datasources = String::new();
        for (name, user) in [
            ("orders", SCRAM_USER),
            ("orders_md5", MD5_USER),
            ("orders_cleartext", CLEARTEXT_USER),
        ] {
            let sealed = seal(&config, name, "password", pg.password(user));
            datasources.push_str(&format!(
                "[datasources.{name}]\nurl = \"postgresql://localhost:{}/{DATABASE}\"\n\
                 ca_file = \"pg-ca.pem\"\n\
                 credential = {{ kind = \"password\", username = \"{user}\", password = \"{sealed}\" }}\n",
                pg.port
            ));
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        let extra = extra(&Setup {
            dir: dir.path(),
            config: &config,
            ca: &ca,
            pg: &pg,
        });
        let toml = format!(
            "{}\n[postgres]\nlisten = [\"{listen}\"]\nlisten_unix = \"sock/.s.PGSQL.{}\"\n{postgres_keys}\n\n{datasources}\n{extra}",
            keys.toml("k1"),
            listen.port()
        );
        let sg = Sealgate::start_logging(dir, &toml, rust_log);
        Fixture {
            pg,
            sg,
            listen,
            socket_dir,
        }
    }

    /// Connection parameters for `dbname` through sealgate over TCP.
    fn at(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={dbname} user=app",
            self.listen.port()
        )
    }

    /// psql through sealgate over TCP; (exit code, stdout, stderr).
    fn psql(&self, dbname: &str, sql: &str) -> (i32, String, String) {
        psql(&[
            &format!(
                "host=127.0.0.1 port={} dbname={dbname} user=app sslmode=disable",
                self.listen.port()
            ),
            "-c",
            sql,
        ])
    }
}

fn psql(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("psql")
        .args(["-X", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn psql_logs_in_with_each_method_the_server_asks_for() {
    let f = Fixture::start("");
    for (ds, user) in [
        ("orders", SCRAM_USER),
        ("orders_md5", MD5_USER),
        ("orders_cleartext", CLEARTEXT_USER),
    ] {
        let (code, out, err) = f.psql(
            ds,
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        assert_eq!(code, 0, "{ds}: {err}\n{}", f.sg.stderr());
        assert_eq!(out, format!("{user}|t"), "{ds} logs in as {user} over TLS");
    }
    let sessions = f.sg.audit_sessions(3);
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    for s in &sessions {
        assert_eq!(s["protocol"], "postgres");
        assert_eq!(s["method"], "postgres");
        assert_eq!(s["client_user"], "app");
        assert_eq!(s["credential"], "datasource");
        assert_eq!(s["decision"], "allow");
        assert_eq!(s["statements"], 1);
        assert!(s["error"].is_null(), "{s}");
        assert_eq!(s["upstream"], format!("127.0.0.1:{}", f.pg.port));
    }
}

async fn connect(params: &str) -> tokio_postgres::Client {
    session(params).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_pipelining_copy_both_ways_and_notifications_work() {
    let f = Fixture::start("");
    let params = f.at("orders");
    let client = connect(&params).await;
    // Prepared statements with binds, several in flight at once.
    let statement = client.prepare("SELECT $1::int8 * 2").await.unwrap();
    let queries = (0..50i64).map(|i| {
        let (client, statement) = (&client, &statement);
        async move {
            client
                .query_one(statement, &[&i])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    });
    let doubled = futures_util::future::join_all(queries).await;
    assert_eq!(doubled, (0..50).map(|i| i * 2).collect::<Vec<i64>>());

    // COPY in: 4 MiB in pieces; COPY out: read back whole.
    client
        .batch_execute("CREATE TEMP TABLE blobs (line text)")
        .await
        .unwrap();
    let line = "x".repeat(1023) + "\n";
    let sink = client.copy_in("COPY blobs FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    for _ in 0..4096 {
        sink.send(bytes::Bytes::from(line.clone())).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 4096);
    let out = client.copy_out("COPY blobs TO STDOUT").await.unwrap();
    use futures_util::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 4096 * 1024);

    // LISTEN on one session, NOTIFY from another.
    let (listener, mut connection) = tokio_postgres::connect(&params, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener
        .batch_execute("LISTEN orders_changed")
        .await
        .unwrap();
    client
        .batch_execute("NOTIFY orders_changed, 'order 42'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s");
    assert_eq!(
        got,
        Some(("orders_changed".to_string(), "order 42".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_server_with_its_key_and_the_client_never_sees_the_servers() {
    let f = Fixture::start("");
    let params = f.at("orders");
    let client = connect(&params).await;
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    ends_with(sleeping, Duration::from_secs(10), SqlState::QUERY_CANCELED).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // The key a client holds is sealgate's own: no server process has
    // the process id in it.
    let (_open, greeting) = raw_startup(f.listen, "orders").await;
    let at = greeting
        .windows(5)
        .position(|w| w == [b'K', 0, 0, 0, 12])
        .expect("BackendKeyData");
    let client_pid = i32::from_be_bytes(greeting[at + 5..at + 9].try_into().unwrap());
    let server_pids = f.pg.superuser_sql(
        "postgres",
        "SELECT string_agg(pid::text, ',') FROM pg_stat_activity",
    );
    assert!(
        !server_pids.split(',').any(|p| p == client_pid.to_string()),
        "{client_pid} is a server process: {server_pids}"
    );
    // A cancel with a made-up key is dropped without a word.
    let mut probe = tokio::net::TcpStream::connect(f.listen).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    cancel.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    probe.write_all(&cancel).await.unwrap();
    let mut rest = Vec::new();
    probe.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// A plain startup for `dbname`: the open session, and everything the
/// server said until ReadyForQuery.
async fn raw_startup(addr: SocketAddr, dbname: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&startup(&[("user", "app"), ("database", dbname)], 3 << 16))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    (stream, got)
}

fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_psql_and_tokio_postgres() {
    let f = Fixture::start("");
    let dir = f.socket_dir.to_str().unwrap().to_string();
    let port = f.listen.port().to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        psql(&[
            &format!("host={dir} port={port} dbname=orders_md5 user=app"),
            "-c",
            "SELECT current_user",
        ])
    })
    .await
    .unwrap();
    assert_eq!((code, out.as_str()), (0, MD5_USER), "{err}");
    let client = connect(&format!(
        "host={} port={} dbname=orders user=app",
        f.socket_dir.display(),
        f.listen.port()
    ))
    .await;
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, SCRAM_USER);
}

const TOKEN: &str = "pg-caller-token-5b8e1d77";
const OTHER_TOKEN: &str = "pg-caller-token-0c41aa90";

/// Callers: `billing` by token (orders only), `reports` by client
/// certificate (orders with its own login, md5_user; and orders_md5).
fn callers_fixture(rust_log: &str) -> (Fixture, PathBuf) {
    let mut cert_files = PathBuf::new();
    let f = Fixture::build(rust_log, "", |s| {
        s.callers(&format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [\"orders\"]\n\n\
             [callers.reports]\ntls_identity = \"spiffe://test/reports\"\n\
             datasources = [\"orders\", \"orders_md5\"]\n",
            sha256_hex(TOKEN)
        ));
        let (cert, key) = s.ca.issue(vec![uri("spiffe://test/reports")]);
        cert_files = s.dir.join("client");
        std::fs::create_dir(&cert_files).unwrap();
        std::fs::write(cert_files.join("cert.pem"), cert).unwrap();
        let key_path = cert_files.join("key.pem");
        std::fs::write(&key_path, key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        s.ca.write_pem(&cert_files.join("ca.pem"));
        let sealed = seal(
            s.config,
            "orders",
            "caller_credentials.reports.password",
            s.pg.password(MD5_USER),
        );
        format!(
            "{}\n[datasources.orders.caller_credentials.reports]\nkind = \"password\"\n\
             username = \"{MD5_USER}\"\npassword = \"{sealed}\"\n",
            s.postgres_tls()
        )
    });
    (f, cert_files)
}

impl Fixture {
    /// psql over TLS, verifying sealgate's certificate for `localhost`.
    fn psql_tls(
        &self,
        client: &std::path::Path,
        conninfo: &str,
        sql: &str,
    ) -> (i32, String, String) {
        psql(&[
            "-w",
            &format!(
                "host=localhost port={} sslmode=verify-full sslrootcert={} user=app {conninfo}",
                self.listen.port(),
                client.join("ca.pem").display()
            ),
            "-c",
            sql,
        ])
    }
}

#[test]
fn callers_prove_themselves_by_token_or_certificate_and_may_log_in_as_themselves() {
    let (f, client) = callers_fixture("info");
    let cert = format!(
        "sslcert={} sslkey={}",
        client.join("cert.pem").display(),
        client.join("key.pem").display()
    );
    let sql =
        "SELECT current_user || ' ' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())";
    let cases: [(&str, String, Result<&str, &str>); 7] = [
        ("orders", format!("password={TOKEN}"), Ok("scram_user true")),
        ("orders", cert.clone(), Ok("md5_user true")),
        ("orders_md5", cert.clone(), Ok("md5_user true")),
        ("orders", format!("password={OTHER_TOKEN}"), Err("sealgate: caller_unauthenticated: unknown caller token")),
        ("orders_md5", format!("password={TOKEN}"), Err("sealgate: caller_forbidden: caller \"billing\" may not use data source \"orders_md5\"")),
        ("nope", format!("password={TOKEN}"), Err("sealgate: unknown_datasource")),
        ("orders", "sslmode=disable".to_string(), Err("fe_sendauth: no password supplied")),
    ];
    for (dbname, conninfo, expected) in &cases {
        let (code, out, err) = f.psql_tls(&client, &format!("dbname={dbname} {conninfo}"), sql);
        match expected {
            Ok(want) => assert_eq!(
                (code, out.as_str()),
                (0, *want),
                "{dbname} {conninfo}: {err}"
            ),
            Err(want) => {
                assert_ne!(code, 0, "{dbname} {conninfo}");
                assert!(err.contains(want), "{dbname} {conninfo}: {err}");
            }
        }
    }
    // A plain connection from loopback may still send its token.
    let (code, out, err) = psql(&[
        "-w",
        &format!(
            "host=127.0.0.1 port={} sslmode=disable dbname=orders user=app password={TOKEN}",
            f.listen.port()
        ),
        "-c",
        "SELECT current_user",
    ]);
    assert_eq!((code, out.as_str()), (0, SCRAM_USER), "{err}");
    // Asked for its token, a client that sends anything but a password
    // message, or an oversized one, is refused.
    for (what, message) in [
        (
            "a query",
            vec![
                b'Q', 0, 0, 0, 13, b'S', b'E', b'L', b'E', b'C', b'T', b' ', b'1', 0,
            ],
        ),
        ("an oversized password", vec![b'p', 0, 1, 0, 0]),
    ] {
        let mut bytes = startup(&[("user", "app"), ("database", "orders")], 3 << 16);
        bytes.extend(message);
        let got = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(exchange(f.listen, &bytes));
        assert_eq!(
            &got[..9],
            &[b'R', 0, 0, 0, 8, 0, 0, 0, 3],
            "{what}: asked for the token"
        );
        let (state, text) = error_of(&got[9..]).unwrap_or_else(|| panic!("{what}: {got:?}"));
        assert_eq!(
            (state.as_str(), text.as_str()),
            (
                "08P01",
                "sealgate: bad_request: expected a password message"
            ),
            "{what}"
        );
    }
    let sessions = f.sg.audit_sessions(10);
    let by = |caller: &str, credential: &str, db_user: &str| {
        sessions.iter().any(|s| {
            s["caller"] == caller
                && s["credential"] == credential
                && s["db_user"] == db_user
                && s["error"].is_null()
        })
    };
    assert!(by("billing", "datasource", SCRAM_USER), "{sessions:#?}");
    assert!(by("reports", "caller", MD5_USER), "{sessions:#?}");
    assert!(by("reports", "datasource", MD5_USER), "{sessions:#?}");
    let errors: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["error"].as_str())
        .collect();
    for code in [
        "caller_unauthenticated",
        "caller_forbidden",
        "unknown_datasource",
    ] {
        assert!(errors.contains(&code), "{code} in {errors:?}");
    }
    f.sg.assert_metrics(&[
        "sealgate_db_sessions_total{caller=\"billing\",datasource=\"orders\",result=\"ok\"}",
        "sealgate_db_sessions_total{caller=\"-\",datasource=\"-\",result=\"caller_unauthenticated\"}",
    ]);
}

/// Sends `bytes` and reads until sealgate closes (within 10 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "sealgate did not close the connection; got {got:?}"
    );
    got
}

/// The SQLSTATE and message of the first ErrorResponse in `bytes`.
fn error_of(bytes: &[u8]) -> Option<(String, String)> {
    let at = bytes.iter().position(|&b| b == b'E')?;
    let len = u32::from_be_bytes(bytes.get(at + 1..at + 5)?.try_into().ok()?) as usize;
    let body = bytes.get(at + 5..at + 1 + len)?;
    let mut fields = std::collections::HashMap::new();
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        fields.insert(field[0], String::from_utf8_lossy(&field[1..]).into_owned());
    }
    Some((fields.remove(&b'C')?, fields.remove(&b'M')?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_refused_startups_get_the_specs_errors_and_are_audited() {
    let f = Fixture::build("info", "handshake_timeout_s = 1", |s| s.postgres_tls());
    let app = |extra: &[(&str, &str)]| {
        let mut params = vec![("user", "app"), ("database", "orders")];
        params.extend_from_slice(extra);
        startup(&params, 3 << 16)
    };
    let mut oversized = app(&[("application_name", &"x".repeat(10_100))]);
    oversized.truncate(10_200);
    let ssl_then_plain = {
        let mut b = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        b.extend(app(&[]));
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "oversized startup",
            oversized,
            "08P01",
            "sealgate: bad_request: a startup packet of",
        ),
        (
            "length under 8",
            vec![0, 0, 0, 3, 0, 0, 0, 0],
            "08P01",
            "sealgate: bad_request",
        ),
        (
            "unknown version",
            startup(&[("user", "app")], 4 << 16),
            "08P01",
            "unsupported frontend protocol 4.0",
        ),
        (
            "options",
            app(&[("options", "-c statement_timeout=0")]),
            "08P01",
            "\"options\" is not accepted",
        ),
        (
            "replication",
            app(&[("replication", "database")]),
            "08P01",
            "\"replication\" is not accepted",
        ),
        (
            "no user",
            startup(&[("database", "orders")], 3 << 16),
            "08P01",
            "names no user",
        ),
        (
            "plaintext after SSLRequest",
            ssl_then_plain,
            "08P01",
            "unencrypted data after the TLS request",
        ),
        (
            "unknown data source",
            startup(&[("user", "app"), ("database", "nope")], 3 << 16),
            "3D000",
            "sealgate: unknown_datasource",
        ),
    ];
    for (what, bytes, sqlstate, message) in &cases {
        let got = exchange(f.listen, bytes).await;
        let (state, text) =
            error_of(&got).unwrap_or_else(|| panic!("{what}: no ErrorResponse in {got:?}"));
        assert_eq!(state, *sqlstate, "{what}: {text}");
        assert!(text.contains(message), "{what}: {text}");
    }
    // GSSENCRequest is declined, then a plain startup goes on as usual.
    let mut gss = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    gss.extend(app(&[("application_name", "gss")]));
    gss.extend([b'X', 0, 0, 0, 4]);
    let got = exchange(f.listen, &gss).await;
    assert_eq!(got.first(), Some(&b'N'));
    assert!(
        got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']),
        "{got:?}"
    );
    // A newer minor version is told what sealgate speaks.
    let mut newer = startup(
        &[
            ("user", "app"),
            ("database", "orders"),
            ("_pq_.compression", "on"),
        ],
        (3 << 16) | 2,
    );
    newer.extend([b'X', 0, 0, 0, 4]);
    let got = exchange(f.listen, &newer).await;
    assert_eq!(&got[..9], &[b'v', 0, 0, 0, 29, 0, 3, 0, 0]);
    assert!(got.windows(16).any(|w| w == b"_pq_.compression"));
    // A client that stalls is closed after handshake_timeout_s.
    let started = std::time::Instant::now();
    let got = exchange(f.listen, &app(&[])[..10]).await;
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    let sessions = f.sg.audit_sessions(cases.len() + 3);
    let errors: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["error"].as_str())
        .collect();
    assert_eq!(
        errors.iter().filter(|e| **e == "bad_request").count(),
        cases.len() - 1 + 1,
        "each malformed startup and the stalled one: {sessions:#?}"
    );
}

/// A server that accepts and answers the TLS request with `answer`, or
/// says nothing at all.
fn odd_server(answer: Option<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut stream = stream;
            let mut request = [0u8; 8];
            let _ = stream.read_exact(&mut request);
            if let Some(answer) = answer {
                let _ = stream.write_all(&[answer]);
            }
            held.push(stream);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_get_the_specs_errors_and_never_the_servers_words() {
    let declines = odd_server(Some(b'N'));
    let silent = odd_server(None);
    let f = Fixture::build("info", "", |s| {
        let mut extra = String::new();
        let wrong = seal(s.config, "wrongpw", "password", "not-the-password");
        let right = seal(s.config, "wrongname", "password", s.pg.password(SCRAM_USER));
        let mut add = |name: &str, url: String, password: &str| {
            extra.push_str(&format!(
                "[datasources.{name}]\nurl = \"{url}\"\nca_file = \"pg-ca.pem\"\nconnect_timeout_ms = 1000\n\
                 credential = {{ kind = \"password\", username = \"{SCRAM_USER}\", password = \"{password}\" }}\n"
            ));
        };
        add(
            "wrongpw",
            format!("postgresql://localhost:{}/{DATABASE}", s.pg.port),
            &wrong,
        );
        add(
            "wrongname",
            format!("postgresql://127.0.0.1:{}/{DATABASE}", s.pg.port),
            &right,
        );
        let none = seal(s.config, "declines", "password", "x");
        add(
            "declines",
            format!("postgresql://localhost:{declines}/{DATABASE}"),
            &none,
        );
        let none = seal(s.config, "silent", "password", "x");
        add(
            "silent",
            format!("postgresql://localhost:{silent}/{DATABASE}"),
            &none,
        );
        let none = seal(s.config, "elsewhere", "password", "x");
        add(
            "elsewhere",
            format!("postgresql://10.1.2.3:5432/{DATABASE}"),
            &none,
        );
        extra
    });
    let cases = [
        (
            "wrongpw",
            "08004",
            "sealgate: upstream_auth: the data source refused the login (SQLSTATE 28P01)",
        ),
        ("wrongname", "08001", "sealgate: upstream_tls"),
        (
            "declines",
            "08001",
            "sealgate: upstream_tls: the server declined TLS",
        ),
        ("silent", "08001", "sealgate: upstream_timeout"),
        (
            "elsewhere",
            "08004",
            "sealgate: egress_denied: 10.1.2.3:5432 matches no [egress] allow entry",
        ),
    ];
    for (ds, sqlstate, message) in cases {
        let got = exchange(
            f.listen,
            &startup(&[("user", "app"), ("database", ds)], 3 << 16),
        )
        .await;
        let (state, text) = error_of(&got).unwrap_or_else(|| panic!("{ds}: {got:?}"));
        assert_eq!(state, sqlstate, "{ds}: {text}");
        assert!(text.starts_with(message), "{ds}: {text}");
        assert!(!text.contains("password authentication failed"), "{text}");
    }
    assert!(f
        .pg
        .log()
        .contains("password authentication failed for user \"scram_user\""));
    f.sg.assert_metrics(&[
        "sealgate_upstream_errors_total{datasource=\"wrongpw\",kind=\"auth\"} 1",
        "sealgate_upstream_errors_total{datasource=\"declines\",kind=\"tls\"} 1",
        "sealgate_upstream_errors_total{datasource=\"silent\",kind=\"timeout\"} 1",
    ]);

    // The server ends a session mid-result: the client's session ends,
    // and so does sealgate's, recorded as the upstream's failure.
    let client = connect(&f.at("orders")).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let streaming = tokio::spawn(async move {
        client
            .simple_query("SELECT repeat('x', 100), generate_series(1, 100000000)")
            .await
    });
    // Under a loaded machine the query may start late: wait until the
    // server runs it, then let it stream a while.
    let state = format!("SELECT state FROM pg_stat_activity WHERE pid = {pid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.pg.superuser_sql("postgres", &state) != "active" {
        assert!(std::time::Instant::now() < deadline, "the query never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.pg.superuser_sql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let ended = tokio::time::timeout(Duration::from_secs(10), streaming)
        .await
        .expect("ends");
    assert!(ended.unwrap().is_err());
    let sessions = f.sg.audit_sessions(cases.len() + 1);
    let by_ds = |ds: &str| {
        sessions
            .iter()
            .find(|s| s["datasource"] == ds)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_ds("wrongpw")["error"], "upstream_auth");
    assert_eq!(by_ds("wrongpw")["decision"], "allow");
    assert_eq!(by_ds("silent")["error"], "upstream_timeout");
    assert_eq!(by_ds("orders")["error"], "upstream_unreachable");
    let cut = by_ds("orders");
    assert!(cut["response_bytes"].as_u64().unwrap() > 100_000, "{cut}");
}

#[test]
fn no_password_token_or_password_hash_appears_anywhere_at_trace_level() {
    let (f, client) = callers_fixture("trace");
    let mut seen = Vec::new();
    let sql = "SELECT current_user";
    for conninfo in [
        format!("dbname=orders password={TOKEN}"),
        format!("dbname=orders password={OTHER_TOKEN}"),
        format!("dbname=orders_md5 password={TOKEN}"),
        format!(
            "dbname=orders sslcert={} sslkey={}",
            client.join("cert.pem").display(),
            client.join("key.pem").display()
        ),
    ] {
        let (_, out, err) = f.psql_tls(&client, &conninfo, sql);
        seen.extend_from_slice(out.as_bytes());
        seen.extend_from_slice(err.as_bytes());
    }
    let (_, out, err) = psql(&[
        "-w",
        &format!(
            "host=127.0.0.1 port={} sslmode=disable dbname=orders user=app password={TOKEN}",
            f.listen.port()
        ),
        "-c",
        "SELECT 1",
    ]);
    seen.extend_from_slice(format!("{out}{err}").as_bytes());
    let sessions = f.sg.audit_sessions(5);
    assert_eq!(sessions.len(), 5, "{sessions:#?}");

    let mut secrets: Vec<String> = vec![TOKEN.into(), OTHER_TOKEN.into()];
    for (user, password) in &f.pg.passwords {
        use md5::{Digest, Md5};
        let stored = Md5::digest(format!("{password}{user}").as_bytes());
        secrets.push(password.clone());
        secrets.push(stored.iter().map(|b| format!("{b:02x}")).collect());
    }
    f.sg.assert_secrets_nowhere(&seen, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_audited_without_literals_bind_values_or_server_error_text() {
    let f = Fixture::start("[audit]\noutput = \"audit.log\"\nstatements = \"fingerprint\"\n");
    let params = f.at("orders");
    let client = connect(&params).await;
    client
        .batch_execute(
            "CREATE TEMP TABLE notes (id int, body text); \
             INSERT INTO notes VALUES (1, 'literal-secret-one'), (2, E'literal\\'secret-two')",
        )
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT id FROM notes WHERE body <> $1 AND id > 0",
            &[&"bind-secret-three"],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let failed = client
        .simple_query("SELECT * FROM missing_table WHERE x = $q$literal-secret-four$q$")
        .await
        .expect_err("no such table");
    assert_eq!(failed.code(), Some(&SqlState::UNDEFINED_TABLE));
    client.batch_execute("SELECT 1").await.unwrap();
    drop(client);

    let sessions = f.sg.audit_sessions(1);
    let audit = std::fs::read_to_string(f.sg.dir.path().join("audit.log")).unwrap();
    let statements: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "statement")
        .collect();
    let find = |text: &str| {
        statements
            .iter()
            .find(|s| s["statement"].as_str().is_some_and(|t| t.contains(text)))
            .unwrap_or_else(|| panic!("no statement like {text:?} in {statements:#?}"))
    };
    let insert = find("INSERT INTO notes");
    assert_eq!(
        insert["statement"],
        "CREATE TEMP TABLE notes (id int, body text); INSERT INTO notes VALUES ($1, $2), ($3, $4)"
    );
    let select = find("SELECT id FROM notes");
    assert_eq!(
        select["statement"],
        "SELECT id FROM notes WHERE body <> $1 AND id > $2"
    );
    assert_eq!(
        (select["command"].as_str(), select["rows"].as_u64()),
        (Some("SELECT"), Some(2))
    );
    let missing = find("missing_table");
    assert_eq!(missing["sqlstate"], "42P01");
    assert!(missing["command"].is_null());
    let one = find("SELECT $1");
    assert_eq!(one["fingerprint"].as_str().map(str::len), Some(16));
    assert_eq!(one["request_id"], sessions[0]["request_id"]);
    assert_eq!(
        sessions[0]["statements"], 4,
        "three simple queries and one execute"
    );
    for leaked in [
        "literal-secret-one",
        "secret-two",
        "bind-secret-three",
        "literal-secret-four",
        "does not exist",
    ] {
        assert!(!audit.contains(leaked), "{leaked} in the audit trail");
    }
    f.sg.assert_metrics(&[
        "sealgate_db_statements_total{command=\"SELECT\",datasource=\"orders\"}",
    ]);
}

/// Waits up to `within` for `task` to end with an error of `state`.
async fn ends_with<T: std::fmt::Debug>(
    task: tokio::task::JoinHandle<Result<T, tokio_postgres::Error>>,
    within: Duration,
    state: SqlState,
) -> tokio_postgres::Error {
    let ended = tokio::time::timeout(within, task)
        .await
        .unwrap_or_else(|_| panic!("not ended within {within:?}"))
        .unwrap();
    let error = ended.expect_err("ended by an error");
    assert_eq!(error.code(), Some(&state), "{error}");
    error
}

/// A session whose connection task's end can be awaited.
async fn session(
    params: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(params, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {params}: {e}"));
    (client, tokio::spawn(connection))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_credential_ends_its_sessions_with_57p01_and_no_others() {
    let f = Fixture::start("");
    let at = |db: &str| f.at(db);
    let (changed, changed_end) = session(&at("orders")).await;
    let (kept, _kept_end) = session(&at("orders_md5")).await;
    changed.batch_execute("SELECT 1").await.unwrap();
    f.sg.edit_config("username = \"scram_user\"", "username = \"md5_user\"");
    let sg = &f.sg;
    tokio::task::block_in_place(|| reload_and_wait(sg, "ok", 1));
    let error = ends_with(
        changed_end,
        Duration::from_secs(1),
        SqlState::ADMIN_SHUTDOWN,
    )
    .await;
    let text = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        text.contains("sealgate: shutting_down: the credential of data source \"orders\" changed"),
        "{text}"
    );
    let user: String = kept
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, MD5_USER, "the other session goes on");
    // New sessions log in with the new credential (md5_user with the
    // password it does not have).
    let refused = tokio_postgres::connect(&at("orders"), tokio_postgres::NoTls)
        .await
        .err()
        .and_then(|e| e.as_db_error().map(|d| d.message().to_string()));
    assert!(refused.is_some_and(|m| m.contains("upstream_auth")));
    let sessions = f.sg.audit_sessions(1);
    assert_eq!(sessions[0]["error"], "shutting_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_lets_sessions_finish_and_ends_the_rest_with_57p01() {
    let mut f = Fixture::build("info", "max_connections = 1", |_| String::new());
    let at = f.at("orders");
    let (idle, idle_end) = session(&at).await;
    idle.batch_execute("SELECT 1").await.unwrap();
    // One connection is all max_connections allows.
    let got = exchange(
        f.listen,
        &startup(&[("user", "app"), ("database", "orders")], 3 << 16),
    )
    .await;
    let (state, text) = error_of(&got).expect("refused");
    assert_eq!(state, "53300", "{text}");
    assert!(text.starts_with("sealgate: too_many_connections"), "{text}");
    let started = std::time::Instant::now();
    f.sg.signal(nix::sys::signal::Signal::SIGTERM);
    // Still served during the grace period (5 s here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    idle.batch_execute("SELECT 2").await.unwrap();
    ends_with(idle_end, Duration::from_secs(10), SqlState::ADMIN_SHUTDOWN).await;
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "not before the grace period ends"
    );
    let sg = &mut f.sg;
    let status = tokio::task::block_in_place(|| sg.wait_exit(Duration::from_secs(10)));
    assert!(status.is_some_and(|s| s.success()), "{:?}", f.sg.stderr());
    let sessions = f.sg.audit_sessions(2);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[0]["error"], "too_many_connections");
    assert_eq!(sessions[1]["error"], "shutting_down");
    assert_eq!(sessions[1]["statements"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_tls_by_token_and_by_client_certificate() {
    let (f, client) = tokio::task::spawn_blocking(|| callers_fixture("info"))
        .await
        .unwrap();
    let roots = std::fs::read_to_string(client.join("ca.pem")).unwrap();
    let cert = std::fs::read_to_string(client.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(client.join("key.pem")).unwrap();
    let at = format!(
        "host=localhost port={} dbname=orders user=app sslmode=require",
        f.listen.port()
    );
    for (identity, conninfo, expected) in [
        (None, format!("{at} password={TOKEN}"), SCRAM_USER),
        (Some((cert.as_str(), key.as_str())), at.clone(), MD5_USER),
    ] {
        let tls = common::postgres::RustlsConnector::from_pem(&roots, identity);
        let (db, connection) = tokio_postgres::connect(&conninfo, tls).await.unwrap();
        tokio::spawn(connection);
        let user: String = db
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, expected);
        let ssl: bool = db
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "the upstream leg is TLS too");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_withdraws_a_callers_grant_ends_its_sessions() {
    let (f, client) = tokio::task::spawn_blocking(|| callers_fixture("info"))
        .await
        .unwrap();
    let roots = std::fs::read_to_string(client.join("ca.pem")).unwrap();
    let cert = std::fs::read_to_string(client.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(client.join("key.pem")).unwrap();
    let open = |dbname: &str, identity: Option<(&str, &str)>, password: &str| {
        let conninfo = format!(
            "host=localhost port={} dbname={dbname} user=app sslmode=require {password}",
            f.listen.port()
        );
        let tls = common::postgres::RustlsConnector::from_pem(&roots, identity);
        async move {
            let (db, connection) = tokio_postgres::connect(&conninfo, tls).await.unwrap();
            (db, tokio::spawn(connection))
        }
    };
    let (reports, reports_end) = open("orders_md5", Some((&cert, &key)), "").await;
    let (billing, _billing_end) = open("orders", None, &format!("password={TOKEN}")).await;
    reports.batch_execute("SELECT 1").await.unwrap();
    let policy = f.sg.dir.path().join("policies/callers.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "datasources = [\"orders\", \"orders_md5\"]",
            "datasources = [\"orders\"]",
        ),
    )
    .unwrap();
    let sg = &f.sg;
    tokio::task::block_in_place(|| reload_and_wait(sg, "ok", 1));
    let error = ends_with(
        reports_end,
        Duration::from_secs(1),
        SqlState::ADMIN_SHUTDOWN,
    )
    .await;
    let text = error.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        text.as_deref(),
        Some("sealgate: shutting_down: caller \"reports\" may no longer use data source \"orders_md5\"")
    );
    billing.batch_execute("SELECT 1").await.unwrap();
}

/// A grant's `not_after` ends the caller's open sessions of it with 57P01
/// within a second, with no reload; new sessions are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_expires_ends_its_sessions_without_a_reload() {
    let f = tokio::task::spawn_blocking(|| {
        Fixture::build("info", "", |s| {
            s.callers(&format!(
                "[callers.billing]\ntoken_sha256 = \"{}\"\n\
                 datasources = [\"orders_md5\", {{ name = \"orders\", not_after = \"{}\" }}]\n",
                sha256_hex(TOKEN),
                utc_in(4).1
            ));
            String::new()
        })
    })
    .await
    .unwrap();
    let policy = std::fs::read_to_string(f.sg.dir.path().join("policies/callers.toml")).unwrap();
    let text = policy.split("not_after = \"").nth(1).unwrap()[..20].to_string();
    let params = |db: &str| format!("{} password={TOKEN}", f.at(db));
    let (expiring, expiring_end) = session(&params("orders")).await;
    let (kept, _kept_end) = session(&params("orders_md5")).await;
    expiring.batch_execute("SELECT 1").await.unwrap();
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(
            f.sg.metrics()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("sealgate_caller_grant_expiry_timestamp_seconds{caller=\"billing\",datasource=\"orders\"} ")
                })
                .and_then(|v| v.parse::<f64>().ok())
                .expect("the grant's gauge") as u64,
        );
    let left = at
        .duration_since(std::time::SystemTime::now())
        .expect("the session opened before the grant ended");
    let error = ends_with(
        expiring_end,
        left + Duration::from_secs(1),
        SqlState::ADMIN_SHUTDOWN,
    )
    .await;
    assert!(
        std::time::SystemTime::now() >= at,
        "the session outlived its grant, not less"
    );
    let message = error.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        message.as_deref(),
        Some(format!(
            "sealgate: shutting_down: caller \"billing\"'s grant of data source \"orders\" expired at {text}"
        ).as_str())
    );
    kept.batch_execute("SELECT 1").await.unwrap();
    let refused = tokio_postgres::connect(&params("orders"), tokio_postgres::NoTls)
        .await
        .err()
        .and_then(|e| {
            e.as_db_error()
                .map(|d| (d.code().clone(), d.message().to_string()))
        });
    let (code, text) = refused.expect("a new session is refused");
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(text.contains("expired at"), "{text}");
    assert!(!f
        .sg
        .metrics()
        .contains("sealgate_config_reloads_total{result=\"ok\"}"));
}
