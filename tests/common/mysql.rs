//! A real MariaDB server for the tests: Debian's `mariadb-server`, a fresh
//! data directory per test, TLS with an rcgen certificate for `localhost`
//! and `require_secure_transport`, and one login per authentication
//! plugin. Run as the `mysql` user when the tests run as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{as_system_user, chown_to_system_user, free_port, random_password, TestCa};

pub const NATIVE_USER: &str = "native_user";
pub const ED25519_USER: &str = "ed25519_user";
pub const DATABASE: &str = "appdb";
const SERVER_USER: &str = "mysql";

pub struct MariaServer {
    pub port: u16,
    pub socket: PathBuf,
    pub passwords: [(&'static str, String); 2],
    dir: tempfile::TempDir,
    child: Child,
}

impl MariaServer {
    /// A running server presenting a certificate for `localhost` signed by
    /// `ca`, refusing connections without TLS (but the Unix socket's).
    pub fn start(ca: &TestCa) -> MariaServer {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        chown_to_system_user(dir.path(), SERVER_USER);
        let data = dir.path().join("data");
        // Each server its own temporary directory: parallel bootstraps in
        // one /tmp lose each other's temporary tables.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("tmpdir");
        chown_to_system_user(&tmp, SERVER_USER);
        let out = as_system_user(&mut Command::new("mariadb-install-db"), SERVER_USER)
            .args([
                "--no-defaults",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .stdin(Stdio::null())
            .output()
            .expect("mariadb-install-db (./dev.sh setup installs mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (cert, key) = ca.issue(vec![super::dns("localhost")]);
        for (name, text) in [("server.crt", cert.as_str()), ("server.key", key.as_str())] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            chown_to_system_user(&path, SERVER_USER);
        }
        let port = free_port();
        let socket = dir.path().join("mysqld.sock");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let child = as_system_user(&mut Command::new("mariadbd"), SERVER_USER)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--require-secure-transport=ON",
                "--plugin-load-add=auth_ed25519",
                "--innodb-buffer-pool-size=16M",
                "--skip-log-bin",
                "--max-connections=60",
                "--max-allowed-packet=64M",
                "--local-infile=1",
            ])
            .arg(format!(
                "--ssl-cert={}",
                dir.path().join("server.crt").display()
            ))
            .arg(format!(
                "--ssl-key={}",
                dir.path().join("server.key").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mariadbd");
        let passwords = [
            (NATIVE_USER, random_password()),
            (ED25519_USER, random_password()),
        ];
        let server = MariaServer {
            port,
            socket,
            passwords,
            dir,
            child,
        };
        server.wait_ready();
        let [(native, native_pw), (ed, ed_pw)] = &server.passwords;
        server.root_sql(&format!(
            "CREATE DATABASE {DATABASE};\
             CREATE USER {native}@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('{native_pw}');\
             CREATE USER {ed}@'127.0.0.1' IDENTIFIED VIA ed25519 USING PASSWORD('{ed_pw}');\
             GRANT ALL ON {DATABASE}.* TO {native}@'127.0.0.1';\
             GRANT ALL ON {DATABASE}.* TO {ed}@'127.0.0.1';"
        ));
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ok = Command::new("mariadb-admin")
                .arg(format!("--socket={}", self.socket.display()))
                .args(["-u", "root", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("MariaDB did not start: {}", self.log());
    }

    pub fn password(&self, user: &str) -> &str {
        &self
            .passwords
            .iter()
            .find(|(u, _)| *u == user)
            .expect("a test login")
            .1
    }

    /// Runs SQL as root over the Unix socket, bypassing sealgate.
    pub fn root_sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .expect("mariadb");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server at once (a crash, from its clients' side).
    pub fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        self.kill();
    }
}
