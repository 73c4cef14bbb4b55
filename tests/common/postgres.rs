//! A real PostgreSQL server for the tests: Debian's `postgresql` package,
//! a fresh cluster per test in a temporary directory, with TLS (an rcgen
//! certificate for `localhost`) and one login per authentication method.
//! PostgreSQL refuses to run as root, and CI runs as root: the cluster then
//! belongs to the `postgres` user the package creates, and its processes
//! run as that user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{free_port, random_password, TestCa};

/// Logins of the test cluster, each allowed only by its method, only over
/// TLS (pg_hba `hostssl`).
pub const SCRAM_USER: &str = "scram_user";
pub const MD5_USER: &str = "md5_user";
pub const CLEARTEXT_USER: &str = "cleartext_user";
pub const DATABASE: &str = "appdb";

/// The newest installed server's binaries (`/usr/lib/postgresql/N/bin`).
pub fn bin_dir() -> PathBuf {
    sealgate::demo_postgres::server_bin()
        .expect("a PostgreSQL server under /usr/lib/postgresql (./dev.sh setup installs it)")
}

/// The server's processes and files belong to this user when we are
/// root.
const SERVER_USER: &str = "postgres";

fn as_server_user(cmd: &mut Command) -> &mut Command {
    super::as_system_user(cmd, SERVER_USER)
}

fn chown_to_server_user(path: &Path) {
    super::chown_to_system_user(path, SERVER_USER)
}

pub struct PgServer {
    pub port: u16,
    /// The Unix socket directory.
    pub socket_dir: PathBuf,
    /// Each login's password.
    pub passwords: [(&'static str, String); 3],
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl PgServer {
    /// A running cluster presenting a certificate for `localhost` (and
    /// `names`) signed by `ca`.
    pub fn start(ca: &TestCa, names: &[&str]) -> PgServer {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        chown_to_server_user(dir.path());
        let data = dir.path().join("data");
        let bin = bin_dir();
        let status = as_server_user(&mut Command::new(bin.join("initdb")))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let mut sans = vec![super::dns("localhost")];
        sans.extend(names.iter().map(|n| super::dns(n)));
        let (cert, key) = ca.issue(sans);
        let write_owned = |name: &str, text: &str, mode: u32| {
            let path = data.join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            chown_to_server_user(&path);
        };
        write_owned("server.crt", &cert, 0o644);
        write_owned("server.key", &key, 0o600);
        let port = free_port();
        let socket_dir = dir.path().to_path_buf();
        write_owned(
            "postgresql.auto.conf",
            &format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 fsync = off\nmax_connections = 50\n",
                socket_dir.display()
            ),
            0o600,
        );
        write_owned(
            "pg_hba.conf",
            &format!(
                "local all postgres trust\n\
                 hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 hostssl all {MD5_USER} 127.0.0.1/32 md5\n\
                 hostssl all {CLEARTEXT_USER} 127.0.0.1/32 password\n"
            ),
            0o600,
        );
        assert!(
            pg_ctl(&data, &["-w", "-t", "30", "start"]),
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
        );
        let passwords = [
            (SCRAM_USER, random_password()),
            (MD5_USER, random_password()),
            (CLEARTEXT_USER, random_password()),
        ];
        let server = PgServer {
            port,
            socket_dir,
            passwords,
            data,
            _dir: dir,
        };
        for (user, password) in &server.passwords {
            let method = if *user == MD5_USER {
                "md5"
            } else {
                "scram-sha-256"
            };
            server.superuser_sql(
                "postgres",
                &format!("SET password_encryption = '{method}'; CREATE ROLE {user} LOGIN PASSWORD '{password}';"),
            );
        }
        server.superuser_sql("postgres", &format!("CREATE DATABASE {DATABASE}"));
        server.superuser_sql(DATABASE, "GRANT ALL ON SCHEMA public TO PUBLIC");
        server
    }

    pub fn password(&self, user: &str) -> &str {
        &self
            .passwords
            .iter()
            .find(|(u, _)| *u == user)
            .expect("a test login")
            .1
    }

    /// Runs SQL as the superuser over the Unix socket, bypassing sealgate.
    pub fn superuser_sql(&self, database: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-d", database, "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Restarts the server as an operator would (`pg_ctl restart -m
    /// fast`): sessions end with 57P01, and for a moment no login is
    /// possible.
    pub fn restart(&self) {
        assert!(
            pg_ctl(&self.data, &["-w", "-t", "30", "-m", "fast", "restart"]),
            "PostgreSQL did not restart: {}",
            self.log()
        );
    }

    /// The server's log (for checking what it saw).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.parent().expect("dir").join("server.log"))
            .unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        pg_ctl(&self.data, &["-m", "immediate", "stop"]);
    }
}

/// `pg_ctl` on the cluster in `data` as the server's user, the server
/// logging to `server.log` beside it; whether it succeeded.
fn pg_ctl(data: &Path, args: &[&str]) -> bool {
    as_server_user(&mut Command::new(bin_dir().join("pg_ctl")))
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(data.parent().expect("dir").join("server.log"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// tokio-postgres over TLS with rustls (the `tokio-postgres-rustls` crate
/// would bring aws-lc): verifies the server against `ca_pem`, presenting
/// `client` (cert PEM, key PEM) when given.
#[derive(Clone)]
pub struct RustlsConnector(std::sync::Arc<rustls::ClientConfig>);

impl RustlsConnector {
    pub fn from_pem(ca_pem: &str, client: Option<(&str, &str)>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = rustls_pemfile::certs(&mut cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain");
                let key = rustls_pemfile::private_key(&mut key.as_bytes())
                    .expect("key")
                    .expect("a key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
        };
        RustlsConnector(std::sync::Arc::new(config))
    }
}

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for RustlsConnector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(RustlsConnect(self.0.clone(), domain.to_string()))
    }
}

/// One connection's TLS: the client config and the server's name.
pub struct RustlsConnect(std::sync::Arc<rustls::ClientConfig>, String);

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<RustlsStream<S>>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = rustls::pki_types::ServerName::try_from(self.1)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            tokio_rustls::TlsConnector::from(self.0)
                .connect(name, stream)
                .await
                .map(RustlsStream)
        })
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for RustlsStream<S>
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for RustlsStream<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream
    for RustlsStream<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}
