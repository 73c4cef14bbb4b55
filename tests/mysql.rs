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
