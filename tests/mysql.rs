//! The MySQL front end to end: real clients (the `mariadb` command-line
//! client, mysql_async) through sealgate to a real MariaDB server started
//! by the test, over TCP, the Unix socket and TLS, with each
//! authentication plugin the server asks for.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

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
    let sessions = f.sg.audit_sessions(2);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
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
