//! The MySQL front end to end: real clients (the `mariadb` command-line
//! client, mysql_async) through sealgate to a real MariaDB server started
//! by the test, over TCP, the Unix socket and TLS, with each
//! authentication plugin the server asks for.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::mysql::{MariaServer, DATABASE, ED25519_USER, NATIVE_USER};
use common::*;

/// What a test's extra config is made with.
struct Setup<'a> {
    dir: &'a std::path::Path,
    config: &'a std::path::Path,
    ca: &'a TestCa,
    db: &'a MariaServer,
}

impl Setup<'_> {
    /// `[mysql.tls]` with a certificate for `localhost` from `ca`, and
    /// client certificates checked against the same CA.
    fn mysql_tls(&self) -> String {
        let (cert, key) = self.ca.issue(vec![dns("localhost")]);
        std::fs::write(self.dir.join("server.pem"), cert).unwrap();
        std::fs::write(self.dir.join("server-key.pem"), key).unwrap();
        self.ca.write_pem(&self.dir.join("callers-ca.pem"));
        "[mysql.tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"callers-ca.pem\"\n".into()
    }

    /// A policy file of callers, next to the loopback egress policy.
    fn callers(&self, policy: &str) {
        write_loopback_policy(self.dir);
        std::fs::write(self.dir.join("policies/callers.toml"), policy).unwrap();
    }
}

/// A MariaDB server, and sealgate in front of it with one data source per
/// login plugin: `crm` (mysql_native_password) and `crm_ed` (ed25519).
struct Fixture {
    db: MariaServer,
    sg: Sealgate,
    listen: SocketAddr,
    socket: PathBuf,
}

impl Fixture {
    fn start(extra: &str) -> Fixture {
        Self::build("info", "", |_| extra.to_string())
    }

    /// `extra` gives more config (and may write policy files) once the
    /// keys, CA and server exist; `front` more of `[mysql]`.
    fn build(rust_log: &str, front: &str, extra: impl FnOnce(&Setup) -> String) -> Fixture {
        let ca = TestCa::new("mysql test CA");
        let db = MariaServer::start(&ca);
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        let config = dir.path().join("sealgate.toml");
        std::fs::write(&config, keys.toml("k1")).unwrap();
        ca.write_pem(&dir.path().join("db-ca.pem"));
        let mut datasources = String::new();
        for (name, user) in [("crm", NATIVE_USER), ("crm_ed", ED25519_USER)] {
            let sealed = seal(&config, name, "password", db.password(user));
            datasources.push_str(&format!(
                "[datasources.{name}]\nurl = \"mysql://localhost:{}/{DATABASE}\"\n\
                 ca_file = \"db-ca.pem\"\n\
                 credential = {{ kind = \"password\", username = \"{user}\", password = \"{sealed}\" }}\n",
                db.port
            ));
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let socket = dir.path().join("mysql.sock");
        let extra = extra(&Setup {
            dir: dir.path(),
            config: &config,
            ca: &ca,
            db: &db,
        });
        let toml = format!(
            "{}\n[mysql]\nlisten = [\"{listen}\"]\nlisten_unix = \"mysql.sock\"\n{front}\n\n{datasources}\n{extra}",
            keys.toml("k1"),
        );
        let sg = Sealgate::start_logging(dir, &toml, rust_log);
        Fixture {
            db,
            sg,
            listen,
            socket,
        }
    }

    /// The `mariadb` client through sealgate over TCP without TLS;
    /// (exit code, stdout, stderr).
    fn mariadb(&self, database: &str, sql: &str) -> (i32, String, String) {
        mariadb(&[
            "-h",
            "127.0.0.1",
            "-P",
            &self.listen.port().to_string(),
            "-u",
            "app",
            "--skip-ssl",
            "-D",
            database,
            "-e",
            sql,
        ])
    }
}

fn mariadb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("mariadb")
        .args([
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "--connect-timeout=10",
        ])
        .args(args)
        .output()
        .expect("mariadb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn the_mariadb_client_logs_in_with_each_plugin_the_server_asks_for() {
    let f = Fixture::start("");
    for (ds, user) in [("crm", NATIVE_USER), ("crm_ed", ED25519_USER)] {
        let (code, out, err) = f.mariadb(
            ds,
            "SELECT CURRENT_USER(), VARIABLE_VALUE <> '' FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'",
        );
        assert_eq!(code, 0, "{ds}: {err}\n{}", f.sg.stderr());
        assert_eq!(
            out,
            format!("{user}@127.0.0.1\t1"),
            "{ds} logs in as {user} over TLS"
        );
    }
    // The character set of the client's handshake (latin1_swedish_ci
    // here) is the upstream session's.
    let mut latin1 = handshake_response(CLIENT, Some("crm"));
    latin1[8] = 8;
    let mut bytes = packet(1, &latin1);
    bytes.extend(packet(0, b"\x03SELECT @@character_set_client"));
    bytes.extend(packet(0, b"\x01"));
    let got = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(exchange(f.listen, &bytes));
    assert!(got.iter().any(|(_, p)| p == b"\x06latin1"), "{got:?}");
    // The Unix socket; and a client asking for compression, which
    // sealgate does not offer, goes on without it.
    let socket = format!("--socket={}", f.socket.display());
    let port = f.listen.port().to_string();
    for args in [
        vec![socket.as_str()],
        vec!["-h", "127.0.0.1", "-P", &port, "--compress"],
    ] {
        let mut all = args.clone();
        all.extend_from_slice(&[
            "-u",
            "app",
            "--skip-ssl",
            "-D",
            "crm",
            "-e",
            "SELECT CURRENT_USER()",
        ]);
        let (code, out, err) = mariadb(&all);
        assert_eq!(
            (code, out.as_str()),
            (0, "native_user@127.0.0.1"),
            "{args:?}: {err}"
        );
    }
    let sessions = f.sg.audit_sessions(5);
    assert_eq!(sessions.len(), 5, "{sessions:?}");
    for s in &sessions {
        assert_eq!(s["protocol"], "mysql");
        assert_eq!(s["method"], "mysql");
        assert_eq!(s["client_user"], "app");
        assert_eq!(s["credential"], "datasource");
        assert_eq!(s["decision"], "allow");
        assert!(s["error"].is_null(), "{s}");
        assert_eq!(s["upstream"], format!("127.0.0.1:{}", f.db.port));
    }
}

fn opts(f: &Fixture, database: &str) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(f.listen.port())
        .user(Some("app"))
        .db_name(Some(database))
        // Else it asks the server for its socket and goes there directly.
        .prefer_socket(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_async_runs_prepared_statements_multi_results_and_20_mib_rows_over_tcp_and_unix() {
    use mysql_async::prelude::*;
    let f = tokio::task::spawn_blocking(|| Fixture::start(""))
        .await
        .unwrap();
    // Over 16 MiB: both ways in continued packets.
    let big: Vec<u8> = (0..20 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    for unix in [false, true] {
        let mut o = opts(&f, "crm");
        if unix {
            o = o.socket(Some(f.socket.to_str().unwrap()));
        }
        let mut conn = mysql_async::Conn::new(o)
            .await
            .unwrap_or_else(|e| panic!("unix={unix}: {e}"));
        conn.query_drop("CREATE TEMPORARY TABLE t (id INT, body LONGBLOB)")
            .await
            .unwrap();
        conn.exec_drop("INSERT INTO t VALUES (?, ?)", (1, big.clone()))
            .await
            .unwrap();
        let back: Option<Vec<u8>> = conn
            .exec_first("SELECT body FROM t WHERE id = ?", (1,))
            .await
            .unwrap();
        assert!(
            back.as_ref() == Some(&big),
            "unix={unix}: the 20 MiB row came back whole"
        );
        let doubled: Vec<i64> = conn
            .exec_map("SELECT ? * 2", (3i64,), |x: i64| x)
            .await
            .unwrap();
        assert_eq!(doubled, vec![6]);
        let statement = conn.prep("SELECT ? + 1").await.unwrap();
        for i in 0..20i64 {
            let got: Option<i64> = conn.exec_first(&statement, (i,)).await.unwrap();
            assert_eq!(got, Some(i + 1));
        }
        conn.close(statement).await.unwrap();
        let mut results = conn
            .query_iter("SELECT 1; SELECT 2, 3 UNION SELECT 4, 5")
            .await
            .unwrap();
        let first: Vec<i64> = results.collect().await.unwrap();
        let second: Vec<(i64, i64)> = results.collect().await.unwrap();
        assert_eq!((first, second), (vec![1], vec![(2, 3), (4, 5)]));
        drop(results);
        // COM_RESET_CONNECTION passes: the temporary table is gone.
        conn.reset().await.unwrap();
        let gone = conn.query_drop("SELECT COUNT(*) FROM t").await.unwrap_err();
        assert!(gone.to_string().contains("1146"), "{gone}");
        conn.disconnect().await.unwrap();
    }
    let sessions = f.sg.audit_sessions(2);
    assert!(
        sessions.iter().all(|s| s["error"].is_null()),
        "{sessions:#?}"
    );
    assert!(sessions
        .iter()
        .all(|s| s["request_bytes"].as_u64().unwrap() > 20 << 20));
    assert!(sessions
        .iter()
        .all(|s| s["response_bytes"].as_u64().unwrap() > 20 << 20));
}

#[test]
fn init_db_switches_schema_and_load_data_local_needs_the_data_sources_consent() {
    let f = Fixture::build("info", "", |s| {
        let sealed = seal(
            s.config,
            "crm_files",
            "password",
            s.db.password(NATIVE_USER),
        );
        format!(
            "[datasources.crm_files]\nurl = \"mysql://localhost:{}/{DATABASE}\"\nca_file = \"db-ca.pem\"\n\
             local_infile = true\n\
             credential = {{ kind = \"password\", username = \"{NATIVE_USER}\", password = \"{sealed}\" }}\n",
            s.db.port
        )
    });
    f.db.root_sql(&format!(
        "CREATE DATABASE other; GRANT ALL ON other.* TO {NATIVE_USER}@'127.0.0.1'"
    ));
    let (code, out, err) = f.mariadb("crm", "USE other; SELECT DATABASE()");
    assert_eq!((code, out.as_str()), (0, "other"), "{err}");
    let file = f.db.dir().join("rows.csv");
    std::fs::write(&file, "1\n2\n3\n").unwrap();
    let load = format!(
        "CREATE TEMPORARY TABLE l (x INT); LOAD DATA LOCAL INFILE '{}' INTO TABLE l; SELECT COUNT(*) FROM l",
        file.display()
    );
    let run = |ds: &str| {
        mariadb(&[
            "-h",
            "127.0.0.1",
            "-P",
            &f.listen.port().to_string(),
            "-u",
            "app",
            "--skip-ssl",
            "--local-infile=1",
            "-D",
            ds,
            "-e",
            &load,
        ])
    };
    let (code, _, err) = run("crm");
    assert_ne!(code, 0, "refused without local_infile");
    // The server refuses it itself: sealgate did not offer it the
    // capability (MariaDB's error 4166, MySQL's 1148).
    assert!(err.contains("local infile capability"), "{err}");
    let (code, out, err) = run("crm_files");
    assert_eq!((code, out.as_str()), (0, "3"), "{err}");
}

const TOKEN: &str = "my-caller-token-7d1c20a9";
const OTHER_TOKEN: &str = "my-caller-token-e4b9f361";

/// Callers: `billing` by token (crm only), `reports` by client
/// certificate (crm with its own login, ed25519_user; and crm_ed).
/// Returns the directory with the client's cert.pem, key.pem and ca.pem.
fn callers_fixture(rust_log: &str) -> (Fixture, PathBuf) {
    let mut cert_files = PathBuf::new();
    let f = Fixture::build(rust_log, "", |s| {
        s.callers(&format!(
            "[callers.billing]\ntoken_sha256 = \"{}\"\ndatasources = [\"crm\"]\n\n\
             [callers.reports]\ntls_identity = \"spiffe://test/reports\"\n\
             datasources = [\"crm\", \"crm_ed\"]\n",
            sha256_hex(TOKEN)
        ));
        let (cert, key) = s.ca.issue(vec![uri("spiffe://test/reports")]);
        cert_files = s.dir.join("client");
        std::fs::create_dir(&cert_files).unwrap();
        std::fs::write(cert_files.join("cert.pem"), cert).unwrap();
        std::fs::write(cert_files.join("key.pem"), key).unwrap();
        let (cert, key) = s.ca.issue_rsa(vec![uri("spiffe://test/reports")]);
        std::fs::write(cert_files.join("rsa-cert.pem"), cert).unwrap();
        std::fs::write(cert_files.join("rsa-key.pem"), key).unwrap();
        s.ca.write_pem(&cert_files.join("ca.pem"));
        let sealed = seal(
            s.config,
            "crm",
            "caller_credentials.reports.password",
            s.db.password(ED25519_USER),
        );
        format!(
            "{}\n[datasources.crm.caller_credentials.reports]\nkind = \"password\"\n\
             username = \"{ED25519_USER}\"\npassword = \"{sealed}\"\n",
            s.mysql_tls()
        )
    });
    (f, cert_files)
}

impl Fixture {
    /// The `mariadb` client over TLS, verifying sealgate's certificate for
    /// `localhost`.
    fn mariadb_tls(
        &self,
        client: &std::path::Path,
        args: &[&str],
        sql: &str,
    ) -> (i32, String, String) {
        let ca = format!("--ssl-ca={}", client.join("ca.pem").display());
        let port = self.listen.port().to_string();
        let mut all = vec![
            "-h",
            "localhost",
            "-P",
            &port,
            "-u",
            "app",
            "--ssl",
            &ca,
            "--ssl-verify-server-cert",
        ];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-e", sql]);
        mariadb(&all)
    }
}

const WHO: &str = "SELECT CURRENT_USER(), VARIABLE_VALUE <> '' FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'";

#[test]
fn callers_prove_themselves_by_token_or_certificate_and_may_log_in_as_themselves() {
    let (f, client) = callers_fixture("info");
    let cert = format!("--ssl-cert={}", client.join("cert.pem").display());
    let key = format!("--ssl-key={}", client.join("key.pem").display());
    let token = format!("--password={TOKEN}");
    let other = format!("--password={OTHER_TOKEN}");
    let native = format!("{NATIVE_USER}@127.0.0.1\t1");
    let ed = format!("{ED25519_USER}@127.0.0.1\t1");
    let cases: [(&[&str], Result<&str, &str>); 7] = [
        (&["-D", "crm", &token], Ok(&native)),
        (&["-D", "crm", &cert, &key], Ok(&ed)),
        (&["-D", "crm_ed", &cert, &key], Ok(&ed)),
        (&["-D", "crm", &other], Err("ERROR 1045 (28000): sealgate: caller_unauthenticated: unknown caller token")),
        (&["-D", "crm_ed", &token], Err("ERROR 1044 (42000): sealgate: caller_forbidden: caller \"billing\" may not use data source \"crm_ed\"")),
        (&["-D", "nope", &token], Err("ERROR 1049 (3D000): sealgate: unknown_datasource: no MySQL data source named \"nope\"")),
        (&[&token], Err("ERROR 1049 (3D000): sealgate: unknown_datasource: the handshake names no database")),
    ];
    for (args, expected) in &cases {
        let (code, out, err) = f.mariadb_tls(&client, args, WHO);
        match expected {
            Ok(want) => assert_eq!((code, out.as_str()), (0, *want), "{args:?}: {err}"),
            Err(want) => {
                assert_ne!(code, 0, "{args:?}");
                assert!(err.contains(want), "{args:?}: {err}");
            }
        }
    }
    // A plain connection from loopback may still send its token; without
    // one it is told how to identify itself.
    let plain = |args: &[&str]| {
        let port = f.listen.port().to_string();
        let mut all = vec![
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            "app",
            "--skip-ssl",
            "-D",
            "crm",
        ];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-e", "SELECT CURRENT_USER()"]);
        mariadb(&all)
    };
    let (code, out, err) = plain(&[&token]);
    assert_eq!((code, out.as_str()), (0, "native_user@127.0.0.1"), "{err}");
    let (code, _, err) = plain(&[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("sealgate: caller_unauthenticated: unknown caller token"),
        "{err}"
    );
    let sessions = f.sg.audit_sessions(10);
    let by = |caller: &str, credential: &str, db_user: &str| {
        sessions.iter().any(|s| {
            s["caller"] == caller
                && s["credential"] == credential
                && s["db_user"] == db_user
                && s["error"].is_null()
        })
    };
    assert!(by("billing", "datasource", NATIVE_USER), "{sessions:#?}");
    assert!(by("reports", "caller", ED25519_USER), "{sessions:#?}");
    assert!(by("reports", "datasource", ED25519_USER), "{sessions:#?}");
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
        "sealgate_db_sessions_total{caller=\"billing\",datasource=\"crm\",result=\"ok\"}",
        "sealgate_db_sessions_total{caller=\"-\",datasource=\"-\",result=\"caller_unauthenticated\"}",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_async_over_tls_by_token_and_by_client_certificate() {
    use mysql_async::prelude::*;
    let (f, client) = tokio::task::spawn_blocking(|| callers_fixture("info"))
        .await
        .unwrap();
    let tls = mysql_async::SslOpts::default().with_root_certs(vec![client.join("ca.pem").into()]);
    // mysql_async reads only PKCS#1 RSA keys.
    let identity = mysql_async::ClientIdentity::new(
        client.join("rsa-cert.pem").into(),
        client.join("rsa-key.pem").into(),
    );
    for (opts, expected) in [
        (
            opts(&f, "crm")
                .ip_or_hostname("localhost")
                .pass(Some(TOKEN))
                .enable_cleartext_plugin(true)
                .ssl_opts(tls.clone()),
            NATIVE_USER,
        ),
        (
            opts(&f, "crm")
                .ip_or_hostname("localhost")
                .ssl_opts(tls.clone().with_client_identity(Some(identity))),
            ED25519_USER,
        ),
    ] {
        let mut conn = mysql_async::Conn::new(opts).await.unwrap();
        let who: Option<(String, String)> = conn.query_first(WHO).await.unwrap();
        assert_eq!(who, Some((format!("{expected}@127.0.0.1"), "1".into())));
        conn.disconnect().await.unwrap();
    }
}

/// One MySQL packet.
fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

const PROTOCOL_41: u32 = 0x0200;
const CONNECT_WITH_DB: u32 = 0x0008;
const SECURE_CONNECTION: u32 = 0x8000;
const PLUGIN_AUTH: u32 = 0x8_0000;
const SSL: u32 = 0x0800;

/// A handshake response of user `app` with no password.
fn handshake_response(capabilities: u32, database: Option<&str>) -> Vec<u8> {
    let capabilities = capabilities | database.map_or(0, |_| CONNECT_WITH_DB);
    let mut out = capabilities.to_le_bytes().to_vec();
    out.extend_from_slice(&(16u32 << 20).to_le_bytes());
    out.push(45);
    out.extend_from_slice(&[0; 23]);
    out.extend_from_slice(b"app\0");
    out.push(0);
    if let Some(db) = database {
        out.extend_from_slice(db.as_bytes());
        out.push(0);
    }
    out.extend_from_slice(b"mysql_native_password\0");
    out
}

const CLIENT: u32 = PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH;
/// COMPRESS, DEPRECATE_EOF, OPTIONAL_RESULTSET_METADATA, ZSTD,
/// QUERY_ATTRIBUTES, MariaDB's PROGRESS.
const NOT_RELAYED: u32 = 0x20 | 0x100_0000 | 0x200_0000 | 0x400_0000 | 0x800_0000 | 0x2000_0000;

/// The capability flags of a greeting.
fn greeting_capabilities(greeting: &[u8]) -> u32 {
    let at = greeting.iter().position(|&b| b == 0).expect("version") + 1 + 4 + 8 + 1;
    let low = u16::from_le_bytes([greeting[at], greeting[at + 1]]) as u32;
    let high = u16::from_le_bytes([greeting[at + 5], greeting[at + 6]]) as u32;
    low | high << 16
}

async fn read_packet(stream: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], payload))
}

/// Connects, reads the greeting, sends `bytes`, and reads packets until
/// sealgate closes (within 10 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let greeting = read_packet(&mut stream).await.expect("greeting");
    assert_eq!(
        (greeting.0, greeting.1[0]),
        (0, 10),
        "a protocol 10 greeting"
    );
    assert_eq!(
        greeting_capabilities(&greeting.1) & NOT_RELAYED,
        0,
        "compression, query attributes, optional metadata and CLIENT_DEPRECATE_EOF are never offered"
    );
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(packet) = read_packet(&mut stream).await {
            got.push(packet);
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "sealgate did not close the connection; got {got:?}"
    );
    got
}

/// The sequence id, error number, SQLSTATE and message of an ERR packet.
fn err_of(packet: &(u8, Vec<u8>)) -> Option<(u8, u16, String, String)> {
    let (seq, p) = packet;
    if p.first() != Some(&0xff) || p.get(3) != Some(&b'#') {
        return None;
    }
    Some((
        *seq,
        u16::from_le_bytes([p[1], p[2]]),
        String::from_utf8_lossy(&p[4..9]).into_owned(),
        String::from_utf8_lossy(&p[9..]).into_owned(),
    ))
}

/// An ERR packet's sequence id, number, SQLSTATE and message start.
type Expected = (u8, u16, &'static str, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_and_refused_commands_get_err_packets_and_are_audited() {
    let f = tokio::task::spawn_blocking(|| {
        Fixture::build("info", "handshake_timeout_s = 1", |s| s.mysql_tls())
    })
    .await
    .unwrap();
    let login = packet(1, &handshake_response(CLIENT, Some("crm")));
    let after_login = |command: Vec<u8>| {
        let mut bytes = login.clone();
        bytes.extend(command);
        bytes
    };
    let mut oversized = vec![0x70, 0x11, 0x01, 1];
    oversized.extend(vec![b'x'; 1000]);
    let mut ssl_then_plain = packet(1, &handshake_response(CLIENT | SSL, None)[..32]);
    ssl_then_plain.extend(packet(2, &handshake_response(CLIENT, Some("crm"))));
    let cases: Vec<(&str, Vec<u8>, Option<Expected>)> = vec![
        (
            "oversized",
            oversized,
            Some((
                1,
                1156,
                "08S01",
                "sealgate: bad_request: a handshake packet of 70000 bytes",
            )),
        ),
        (
            "out of sequence",
            packet(3, &handshake_response(CLIENT, Some("crm"))),
            Some((
                4,
                1156,
                "08S01",
                "sealgate: bad_request: a handshake packet out of sequence",
            )),
        ),
        (
            "pre-4.1",
            packet(1, &handshake_response(SECURE_CONNECTION, Some("crm"))),
            Some((
                2,
                1156,
                "08S01",
                "sealgate: bad_request: a client of the pre-4.1 protocol",
            )),
        ),
        (
            "malformed",
            packet(1, &[0, 2, 0, 0]),
            Some((
                2,
                1156,
                "08S01",
                "sealgate: bad_request: a malformed handshake response",
            )),
        ),
        (
            "no database",
            packet(1, &handshake_response(CLIENT, None)),
            Some((
                2,
                1049,
                "3D000",
                "sealgate: unknown_datasource: the handshake names no database",
            )),
        ),
        (
            "unknown",
            packet(1, &handshake_response(CLIENT, Some("nope"))),
            Some((
                2,
                1049,
                "3D000",
                "sealgate: unknown_datasource: no MySQL data source named \"nope\"",
            )),
        ),
        ("TLS request, then plaintext", ssl_then_plain, None),
        (
            "command out of sequence",
            after_login(packet(3, b"\x03SELECT 1")),
            Some((
                4,
                1156,
                "08S01",
                "sealgate: bad_request: a command packet out of sequence",
            )),
        ),
        (
            "empty command",
            after_login(packet(0, b"")),
            Some((
                1,
                1156,
                "08S01",
                "sealgate: bad_request: an empty command packet",
            )),
        ),
        (
            "COM_CHANGE_USER",
            after_login(packet(0, b"\x11root\0\0")),
            Some((
                1,
                1227,
                "42000",
                "sealgate: bad_request: COM_CHANGE_USER is not supported",
            )),
        ),
        (
            "COM_BINLOG_DUMP",
            after_login(packet(0, b"\x12\0\0\0\0\0\0\0\0\0\0")),
            Some((
                1,
                1227,
                "42000",
                "sealgate: bad_request: replication commands are not relayed",
            )),
        ),
    ];
    for (what, bytes, expected) in &cases {
        let got = exchange(f.listen, bytes).await;
        let error = got.iter().find_map(err_of);
        match expected {
            None => assert!(
                error.is_none() && got.is_empty(),
                "{what}: closed without an answer: {got:?}"
            ),
            Some((seq, number, state, text)) => {
                let (s, n, st, t) = error.unwrap_or_else(|| panic!("{what}: no ERR in {got:?}"));
                assert_eq!((s, n, st.as_str()), (*seq, *number, *state), "{what}: {t}");
                assert!(t.starts_with(text), "{what}: {t}");
            }
        }
    }
    // A client that stalls is closed after handshake_timeout_s.
    let started = std::time::Instant::now();
    let got = exchange(f.listen, &login[..10]).await;
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    let sessions = f.sg.audit_sessions(cases.len() + 1);
    let count = |code: &str| sessions.iter().filter(|s| s["error"] == code).count();
    assert_eq!(count("bad_request"), cases.len() - 2 + 1, "{sessions:#?}");
    assert_eq!(count("unknown_datasource"), 2, "{sessions:#?}");
    let tls = sessions.iter().find(|s| {
        s["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("TLS after the TLS request failed"))
    });
    assert!(tls.is_some(), "{sessions:#?}");
    f.sg.assert_metrics(&[
        "sealgate_db_sessions_total{caller=\"local\",datasource=\"crm\",result=\"bad_request\"} 4",
    ]);
}

/// A MySQL server written here from the protocol documentation, for what
/// the MariaDB server cannot show: `caching_sha2_password` (MySQL 8's
/// default, which no package this machine reaches serves), a server
/// without TLS, and one that asks the client for a file. Each connection:
/// greeting, optional TLS, the scramble checked, fast or full
/// authentication, then OK to every query (a file request to one that
/// says LOCAL).
#[derive(Clone)]
struct Sha2Peer {
    tls: Option<Arc<rustls::ServerConfig>>,
    password: String,
    full: bool,
    /// Answer the login with a switch to this plugin instead.
    switch: Option<&'static str>,
}

use std::sync::Arc;

trait SyncIo: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> SyncIo for T {}

fn sync_read(io: &mut dyn SyncIo) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    io.read_exact(&mut head).ok()?;
    let mut payload = vec![0u8; u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize];
    io.read_exact(&mut payload).ok()?;
    Some((head[3], payload))
}

fn sync_send(io: &mut dyn SyncIo, seq: u8, payload: &[u8]) -> Option<()> {
    io.write_all(&packet(seq, payload)).ok()?;
    io.flush().ok()
}

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().to_vec()
}

impl Sha2Peer {
    fn start(self) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let peer = self.clone();
                std::thread::spawn(move || peer.serve(stream));
            }
        });
        port
    }

    fn serve(&self, tcp: std::net::TcpStream) -> Option<()> {
        let nonce = b"0123456789abcdefghij";
        let mut io: Box<dyn SyncIo> = Box::new(tcp.try_clone().ok()?);
        let caps: u32 = CLIENT
            | CONNECT_WITH_DB
            | 0x2000
            | 0x2_0000
            | 0x4_0000
            | 0x80_0000
            | 0x80
            | 0x20_0000
            | if self.tls.is_some() { SSL } else { 0 };
        let mut greeting = vec![10];
        greeting.extend_from_slice(b"8.0.36\0");
        greeting.extend_from_slice(&7u32.to_le_bytes());
        greeting.extend_from_slice(&nonce[..8]);
        greeting.push(0);
        greeting.extend_from_slice(&(caps as u16).to_le_bytes());
        greeting.push(255);
        greeting.extend_from_slice(&2u16.to_le_bytes());
        greeting.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        greeting.push(21);
        greeting.extend_from_slice(&[0; 10]);
        greeting.extend_from_slice(&nonce[8..]);
        greeting.push(0);
        greeting.extend_from_slice(b"caching_sha2_password\0");
        sync_send(&mut *io, 0, &greeting)?;
        let (mut seq, mut response) = sync_read(&mut *io)?;
        if response.len() == 32 {
            let conn = rustls::ServerConnection::new(self.tls.clone()?).ok()?;
            io = Box::new(rustls::StreamOwned::new(conn, tcp));
            (seq, response) = sync_read(&mut *io)?;
        }
        let mut rest = &response[32..];
        let user_end = rest.iter().position(|&b| b == 0)?;
        rest = &rest[user_end + 1..];
        let len = rest[0] as usize;
        let scramble = rest[1..1 + len].to_vec();
        let expected: Vec<u8> = sha256(&[self.password.as_bytes()])
            .iter()
            .zip(sha256(&[
                &sha256(&[&sha256(&[self.password.as_bytes()])]),
                nonce,
            ]))
            .map(|(a, b)| a ^ b)
            .collect();
        let mut seq = seq + 1;
        if let Some(plugin) = self.switch {
            sync_send(
                &mut *io,
                seq,
                &[b"\xfe", plugin.as_bytes(), b"\0", nonce, b"\0"].concat(),
            )?;
            // sealgate must hang up rather than answer.
            return sync_read(&mut *io).map(|_| ());
        }
        let denied = |io: &mut dyn SyncIo, seq: u8| {
            let mut err = vec![0xff, 0x15, 0x04, b'#'];
            err.extend_from_slice(
                b"28000Access denied for user 'sha2_user'@'localhost' (using password: YES)",
            );
            sync_send(io, seq, &err)
        };
        if scramble != expected {
            return denied(&mut *io, seq);
        }
        if self.full {
            sync_send(&mut *io, seq, &[0x01, 0x04])?;
            let (got, clear) = sync_read(&mut *io)?;
            seq = got + 1;
            if clear != [self.password.as_bytes(), b"\0"].concat() {
                return denied(&mut *io, seq);
            }
        } else {
            sync_send(&mut *io, seq, &[0x01, 0x03])?;
            seq += 1;
        }
        sync_send(&mut *io, seq, &[0, 0, 0, 2, 0, 0, 0])?;
        loop {
            let (_, command) = sync_read(&mut *io)?;
            match command.first() {
                Some(0x01) | None => return Some(()),
                Some(0x03) if command.windows(5).any(|w| w == b"LOCAL") => {
                    sync_send(&mut *io, 1, b"\xfb/etc/passwd")?
                }
                _ => sync_send(&mut *io, 1, &[0, 0, 0, 2, 0, 0, 0])?,
            }
        }
    }
}

#[test]
fn caching_sha2_fast_and_full_authentication_and_what_sealgate_refuses_to_do() {
    let f = Fixture::build("info", "", |s| {
        let mut extra = String::new();
        let tls = s.ca.server_config(&["localhost"]);
        for (name, tls, full, ssl_mode, password, switch) in [
            (
                "sha2_full_tls",
                Some(tls.clone()),
                true,
                "verify_identity",
                "right",
                None,
            ),
            ("sha2_fast_plain", None, false, "disabled", "right", None),
            ("sha2_full_plain", None, true, "disabled", "right", None),
            (
                "sha2_wrong",
                Some(tls.clone()),
                false,
                "verify_identity",
                "wrong",
                None,
            ),
            ("no_tls", None, false, "verify_identity", "right", None),
            (
                "dialog",
                Some(tls.clone()),
                false,
                "verify_identity",
                "right",
                Some("dialog"),
            ),
            (
                "clear_plain",
                None,
                false,
                "disabled",
                "right",
                Some("mysql_clear_password"),
            ),
        ] {
            let port = Sha2Peer {
                tls,
                password: "right".into(),
                full,
                switch,
            }
            .start();
            let sealed = seal(s.config, name, "password", password);
            // Plaintext only to an address allow_private admits.
            let (host, ca) = match ssl_mode {
                "disabled" => ("127.0.0.1", ""),
                _ => ("localhost", "ca_file = \"db-ca.pem\"\n"),
            };
            extra.push_str(&format!(
                "[datasources.{name}]\nurl = \"mysql://{host}:{port}/app\"\n{ca}\
                 ssl_mode = \"{ssl_mode}\"\nconnect_timeout_ms = 2000\n\
                 credential = {{ kind = \"password\", username = \"sha2_user\", password = \"{sealed}\" }}\n"
            ));
        }
        write_loopback_policy(s.dir);
        extra
    });
    for (ds, expected) in [
        ("sha2_full_tls", Ok(())),
        ("sha2_fast_plain", Ok(())),
        ("sha2_full_plain", Err("ERROR 1045 (08004): sealgate: upstream_auth: the server needs caching_sha2_password's full authentication, which sealgate does only over TLS")),
        ("sha2_wrong", Err("ERROR 1045 (08004): sealgate: upstream_auth: the data source refused the login (error 1045, SQLSTATE 28000)")),
        ("no_tls", Err("ERROR 1429 (08001): sealgate: upstream_tls: the server declined TLS (ssl_mode is verify_identity)")),
        ("dialog", Err("ERROR 1045 (08004): sealgate: upstream_auth: the server asked for the auth plugin \"dialog\", which sealgate does not support")),
        ("clear_plain", Err("ERROR 1045 (08004): sealgate: upstream_auth: the server asked for the password in clear text over a connection without TLS; refused")),
    ] {
        let (code, _, err) = f.mariadb(ds, "DO 1");
        match expected {
            Ok(()) => assert_eq!(code, 0, "{ds}: {err}"),
            Err(want) => {
                assert!(err.contains(want), "{ds}: {err}");
                assert!(!err.contains("Access denied"), "{ds}: the server's words: {err}");
            }
        }
    }
    // A server that asks for a client file without the data source's
    // consent: the request never reaches the client.
    let (code, _, err) = mariadb(&[
        "-h",
        "127.0.0.1",
        "-P",
        &f.listen.port().to_string(),
        "-u",
        "app",
        "--skip-ssl",
        "--local-infile=1",
        "-D",
        "sha2_full_tls",
        "-e",
        "LOAD DATA LOCAL INFILE 'x' INTO TABLE t",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("ERROR 1148 (42000)")
            && err.contains("sealgate: bad_request: the server asked for a client file"),
        "{err}"
    );
    let sessions = f.sg.audit_sessions(8);
    let error = |ds: &str| {
        sessions
            .iter()
            .filter(|s| s["datasource"] == ds)
            .map(|s| s["error"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        error("sha2_full_tls"),
        vec![serde_json::Value::Null, "bad_request".into()]
    );
    assert_eq!(
        error("sha2_full_plain"),
        vec![serde_json::Value::from("upstream_auth")]
    );
    assert_eq!(
        error("no_tls"),
        vec![serde_json::Value::from("upstream_tls")]
    );
    f.sg.assert_metrics(&[
        "sealgate_upstream_errors_total{datasource=\"sha2_wrong\",kind=\"auth\"} 1",
        "sealgate_upstream_errors_total{datasource=\"no_tls\",kind=\"tls\"} 1",
        "sealgate_upstream_errors_total{datasource=\"sha2_full_tls\",kind=\"protocol\"} 1",
    ]);
}

/// A server that accepts and says nothing.
fn silent_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().flatten().collect();
        drop(held);
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_get_the_specs_errors_and_never_the_servers_words() {
    use mysql_async::prelude::*;
    let silent = silent_server();
    let f = tokio::task::spawn_blocking(move || {
        Fixture::build("info", "", |s| {
            let mut extra = String::new();
            let mut add = |name: &str, url: String, password: &str| {
                let sealed = seal(s.config, name, "password", password);
                extra.push_str(&format!(
                    "[datasources.{name}]\nurl = \"{url}\"\nca_file = \"db-ca.pem\"\nconnect_timeout_ms = 1000\n\
                     credential = {{ kind = \"password\", username = \"{NATIVE_USER}\", password = \"{sealed}\" }}\n"
                ));
            };
            add("wrongpw", format!("mysql://localhost:{}/{DATABASE}", s.db.port), "not-the-password");
            add("wrongname", format!("mysql://127.0.0.1:{}/{DATABASE}", s.db.port), s.db.password(NATIVE_USER));
            add("silent", format!("mysql://localhost:{silent}/{DATABASE}"), "x");
            add("elsewhere", format!("mysql://10.1.2.3:3306/{DATABASE}"), "x");
            extra
        })
    })
    .await
    .unwrap();
    let cases = [
        ("wrongpw", 1045, "08004", "sealgate: upstream_auth: the data source refused the login (error 1045, SQLSTATE 28000)"),
        ("wrongname", 1429, "08001", "sealgate: upstream_tls: TLS with the server failed"),
        ("silent", 1429, "08001", "sealgate: upstream_timeout"),
        ("elsewhere", 1130, "08004", "sealgate: egress_denied: 10.1.2.3:3306 matches no [egress] allow entry"),
    ];
    for (ds, number, sqlstate, message) in cases {
        let got = exchange(f.listen, &packet(1, &handshake_response(CLIENT, Some(ds)))).await;
        let (seq, n, state, text) = got
            .iter()
            .find_map(err_of)
            .unwrap_or_else(|| panic!("{ds}: {got:?}"));
        assert_eq!(
            (seq, n, state.as_str()),
            (2, number, sqlstate),
            "{ds}: {text}"
        );
        assert!(text.starts_with(message), "{ds}: {text}");
        assert!(!text.contains("Access denied"), "{text}");
    }
    f.sg.assert_metrics(&[
        "sealgate_upstream_errors_total{datasource=\"wrongpw\",kind=\"auth\"} 1",
        "sealgate_upstream_errors_total{datasource=\"wrongname\",kind=\"tls\"} 1",
        "sealgate_upstream_errors_total{datasource=\"silent\",kind=\"timeout\"} 1",
    ]);

    // The server ends a session mid-result: the client's session ends,
    // and so does sealgate's, recorded as the upstream's failure.
    let mut conn = mysql_async::Conn::new(opts(&f, "crm")).await.unwrap();
    let id: Option<u64> = conn.query_first("SELECT CONNECTION_ID()").await.unwrap();
    let streaming = tokio::spawn(async move {
        conn.query_iter("SELECT REPEAT('x', 100), seq FROM seq_1_to_100000000")
            .await?
            .for_each(|_| {})
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db = &f.db;
    tokio::task::block_in_place(|| db.root_sql(&format!("KILL {}", id.unwrap())));
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
    assert_eq!(by_ds("elsewhere")["decision"], "deny");
    assert_eq!(by_ds("crm")["error"], "upstream_unreachable");
    assert!(by_ds("crm")["response_bytes"].as_u64().unwrap() > 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_audited_without_literals_parameters_or_server_error_text() {
    use mysql_async::prelude::*;
    let f = tokio::task::spawn_blocking(|| {
        Fixture::start("[audit]\noutput = \"audit.log\"\nstatements = \"fingerprint\"\n")
    })
    .await
    .unwrap();
    let mut conn = mysql_async::Conn::new(opts(&f, "crm")).await.unwrap();
    conn.query_drop(
        "CREATE TEMPORARY TABLE notes (id INT, body TEXT); \
         INSERT INTO notes VALUES (1, 'literal-secret-one'), (2, \"literal\\\"secret-two\") # literal-secret-comment",
    )
    .await
    .unwrap();
    let rows: Vec<i64> = conn
        .exec(
            "SELECT id FROM notes WHERE body <> ? AND id > 0",
            ("bind-secret-three",),
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let failed = conn
        .query_drop(
            "SELECT * FROM missing_table WHERE x = x'6c69746572616c2d7365637265742d666f7572'",
        )
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("1146"), "{failed}");
    let prepare_failed = conn
        .prep("SELECT nope FROM missing_table WHERE y = 'literal-secret-five'")
        .await;
    assert!(prepare_failed.is_err());
    conn.query_drop("SELECT 1").await.unwrap();
    conn.disconnect().await.unwrap();

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
            .filter(|s| s["statement"].as_str().is_some_and(|t| t.contains(text)))
            .collect::<Vec<_>>()
    };
    // A multi-statement query: one record per result, under its text.
    let insert = find("INSERT INTO notes");
    assert_eq!(insert.len(), 2, "{statements:#?}");
    assert_eq!(
        insert[0]["statement"],
        "CREATE TEMPORARY TABLE notes (id INT, body TEXT); INSERT INTO notes VALUES (?, ?), (?, ?)"
    );
    assert_eq!(
        (insert[1]["command"].as_str(), insert[1]["rows"].as_u64()),
        (Some("CREATE"), Some(2))
    );
    let select = find("SELECT id FROM notes");
    assert_eq!(
        select.len(),
        1,
        "the execute, under its prepared text: {statements:#?}"
    );
    assert_eq!(
        select[0]["statement"],
        "SELECT id FROM notes WHERE body <> ? AND id > ?"
    );
    assert_eq!(
        (select[0]["command"].as_str(), select[0]["rows"].as_u64()),
        (Some("SELECT"), Some(2))
    );
    let missing = find("FROM missing_table");
    assert_eq!(
        missing.len(),
        2,
        "the failed query and the failed prepare: {statements:#?}"
    );
    assert!(missing
        .iter()
        .all(|m| m["sqlstate"] == "42S02" && m["command"].is_null()));
    let one = find("SELECT ?");
    assert_eq!(one[0]["fingerprint"].as_str().map(str::len), Some(16));
    assert_eq!(one[0]["request_id"], sessions[0]["request_id"]);
    assert_eq!(one[0]["method"], "mysql");
    assert_eq!(
        sessions[0]["statements"], 5,
        "mysql_async's settings query, three queries and one execute: {:#?}",
        sessions[0]
    );
    for leaked in [
        "literal-secret",
        "secret-two",
        "bind-secret-three",
        "6c69746572616c",
        "doesn't exist",
    ] {
        assert!(!audit.contains(leaked), "{leaked} in the audit trail");
    }
    f.sg.assert_metrics(&["sealgate_db_statements_total{command=\"SELECT\",datasource=\"crm\"}"]);
}

/// Waits up to `within` for `task` to end with the server error `number`;
/// returns its message.
async fn ends_with<T: std::fmt::Debug + Send + 'static>(
    task: tokio::task::JoinHandle<Result<T, mysql_async::Error>>,
    within: Duration,
    number: u16,
) -> String {
    let ended = tokio::time::timeout(within, task)
        .await
        .unwrap_or_else(|_| panic!("not ended within {within:?}"))
        .unwrap();
    match ended {
        Err(mysql_async::Error::Server(e)) => {
            assert_eq!(e.code, number, "{e:?}");
            e.message
        }
        other => panic!("expected server error {number}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_credential_ends_its_sessions_with_1053_and_no_others() {
    use mysql_async::prelude::*;
    let f = tokio::task::spawn_blocking(|| Fixture::start(""))
        .await
        .unwrap();
    let mut changed = mysql_async::Conn::new(opts(&f, "crm")).await.unwrap();
    let mut kept = mysql_async::Conn::new(opts(&f, "crm_ed")).await.unwrap();
    changed.query_drop("DO 1").await.unwrap();
    let waiting = tokio::spawn(async move { changed.query_drop("DO SLEEP(20)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.sg.edit_config(
        &format!("username = \"{NATIVE_USER}\""),
        &format!("username = \"{ED25519_USER}\""),
    );
    let sg = &f.sg;
    tokio::task::block_in_place(|| reload_and_wait(sg, "ok", 1));
    let text = ends_with(waiting, Duration::from_secs(1), 1053).await;
    assert!(
        text.contains("sealgate: shutting_down: the credential of data source \"crm\" changed"),
        "{text}"
    );
    let user: Option<String> = kept.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(
        user.as_deref(),
        Some("ed25519_user@127.0.0.1"),
        "the other session goes on"
    );
    let sessions = f.sg.audit_sessions(1);
    assert_eq!(sessions[0]["error"], "shutting_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_lets_sessions_finish_and_ends_the_rest_with_1053() {
    use mysql_async::prelude::*;
    let mut f = tokio::task::spawn_blocking(|| {
        Fixture::build("info", "max_connections = 1", |_| String::new())
    })
    .await
    .unwrap();
    let mut conn = mysql_async::Conn::new(opts(&f, "crm")).await.unwrap();
    conn.query_drop("DO 1").await.unwrap();
    // One connection is all max_connections allows.
    // It is told so instead of a greeting, as a full server does.
    let mut second = tokio::net::TcpStream::connect(f.listen).await.unwrap();
    let first = read_packet(&mut second).await.expect("an answer");
    let (seq, number, state, text) = err_of(&first).expect("refused");
    assert_eq!((seq, number, state.as_str()), (0, 1040, "08004"), "{text}");
    assert!(text.starts_with("sealgate: too_many_connections"), "{text}");
    let started = std::time::Instant::now();
    f.sg.signal(nix::sys::signal::Signal::SIGTERM);
    // Still served during the grace period (5 s here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.query_drop("DO 2").await.unwrap();
    let waiting = tokio::spawn(async move { conn.query_drop("DO SLEEP(30)").await });
    ends_with(waiting, Duration::from_secs(10), 1053).await;
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
    assert_eq!(
        sessions[1]["statements"], 4,
        "the settings query, two DOs and the sleep"
    );
}

#[test]
fn no_password_token_or_password_hash_appears_anywhere_at_trace_level() {
    let (f, client) = callers_fixture("trace");
    let mut seen = Vec::new();
    let cert = format!("--ssl-cert={}", client.join("cert.pem").display());
    let key = format!("--ssl-key={}", client.join("key.pem").display());
    let token = format!("--password={TOKEN}");
    let other = format!("--password={OTHER_TOKEN}");
    for args in [
        vec!["-D", "crm", token.as_str()],
        vec!["-D", "crm", other.as_str()],
        vec!["-D", "crm_ed", token.as_str()],
        vec!["-D", "crm", cert.as_str(), key.as_str()],
    ] {
        let (_, out, err) = f.mariadb_tls(&client, &args, "SELECT CURRENT_USER()");
        seen.extend_from_slice(format!("{out}{err}").as_bytes());
    }
    let (_, out, err) = mariadb(&[
        "-h",
        "127.0.0.1",
        "-P",
        &f.listen.port().to_string(),
        "-u",
        "app",
        "--skip-ssl",
        "-D",
        "crm",
        &token,
        "-e",
        "SELECT 1",
    ]);
    seen.extend_from_slice(format!("{out}{err}").as_bytes());
    let sessions = f.sg.audit_sessions(5);
    assert_eq!(sessions.len(), 5, "{sessions:#?}");

    let mut secrets: Vec<String> = vec![TOKEN.into(), OTHER_TOKEN.into()];
    for (_, password) in &f.db.passwords {
        use sha1::{Digest, Sha1};
        // What mysql_native_password stores and a stolen scramble proves.
        let stage1 = Sha1::digest(password.as_bytes());
        let stored = Sha1::digest(stage1);
        secrets.push(password.clone());
        secrets.push(stage1.iter().map(|b| format!("{b:02x}")).collect());
        secrets.push(stored.iter().map(|b| format!("{b:02x}")).collect());
    }
    f.sg.assert_secrets_nowhere(&seen, &secrets);
}

/// A grant's `not_after` ends the caller's open sessions of it with 1053
/// within a second, with no reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_expires_ends_its_sessions_without_a_reload() {
    use mysql_async::prelude::*;
    let (at, text) = utc_in(4);
    let f = tokio::task::spawn_blocking(move || {
        Fixture::build("info", "", |s| {
            s.callers(&format!(
                "[callers.billing]\ntoken_sha256 = \"{}\"\n\
                 datasources = [{{ name = \"crm\", not_after = \"{text}\" }}]\n",
                sha256_hex(TOKEN)
            ));
            String::new()
        })
    })
    .await
    .unwrap();
    let as_billing = || {
        opts(&f, "crm")
            .pass(Some(TOKEN))
            .enable_cleartext_plugin(true)
    };
    let mut expiring = mysql_async::Conn::new(as_billing()).await.unwrap();
    expiring.query_drop("DO 1").await.unwrap();
    let waiting = tokio::spawn(async move { expiring.query_drop("DO SLEEP(20)").await });
    let end = std::time::UNIX_EPOCH + Duration::from_secs(at);
    let left = end
        .duration_since(std::time::SystemTime::now())
        .expect("the session opened before the grant ended");
    let message = ends_with(waiting, left + Duration::from_secs(1), 1053).await;
    assert!(
        std::time::SystemTime::now() >= end,
        "ended before the grant did"
    );
    assert!(
        message.contains("grant of data source \"crm\" expired at"),
        "{message}"
    );
    let refused = mysql_async::Conn::new(as_billing()).await.err();
    assert!(
        matches!(&refused, Some(mysql_async::Error::Server(e)) if e.code == 1044),
        "{refused:?}"
    );
}
