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

/// A PostgreSQL server, and sealgate in front of it with one data source
/// per login method: `orders` (SCRAM), `orders_md5`, `orders_cleartext`.
struct Fixture {
    pg: PgServer,
    sg: Sealgate,
    ca: TestCa,
    listen: SocketAddr,
    socket_dir: PathBuf,
}

impl Fixture {
    fn start(extra: &str) -> Fixture {
        Self::start_logging(extra, "info")
    }

    fn start_logging(extra: &str, rust_log: &str) -> Fixture {
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
        let toml = format!(
            "{}\n[postgres]\nlisten = [\"{listen}\"]\nlisten_unix = \"sock/.s.PGSQL.{}\"\n\n{datasources}\n{extra}",
            keys.toml("k1"),
            listen.port()
        );
        let sg = Sealgate::start_logging(dir, &toml, rust_log);
        Fixture {
            pg,
            sg,
            ca,
            listen,
            socket_dir,
        }
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
        let (code, out, err) = f.psql(ds, "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
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
