//! The PostgreSQL part of `sealgate demo`: a throwaway cluster from the
//! machine's own PostgreSQL server, logged in to by sealgate with a sealed
//! password the app never sees. Skipped (with how to get it) when no
//! server is installed.
//!
//! ```text
//! sealgate demo
//! psql "host=127.0.0.1 port=6432 dbname=pgdemo user=app" -c 'SELECT current_user'
//! ```

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

use crate::secrets::{self, Keyring, Secret};

/// The database login the cluster is made with.
const USER: &str = "demo_app";

/// A running cluster and what the demo config needs to reach it.
pub struct DemoCluster {
    pub port: u16,
    /// The `[datasources.pgdemo]` table, its password sealed.
    pub datasource: String,
}

/// The newest installed server's `bin` directory (Debian keeps it off
/// `PATH`), if any.
pub fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// PostgreSQL refuses to run as root: as root, the cluster belongs to the
/// `postgres` user the package creates.
fn server_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    nix::unistd::User::from_name("postgres").ok().flatten()
}

fn command(program: &Path, user: &Option<nix::unistd::User>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = user {
        cmd.gid(user.gid.as_raw()).uid(user.uid.as_raw());
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

/// Starts a cluster on a free loopback port; `Err` says why not, for the
/// demo to print instead.
pub fn start(keyring: &Keyring) -> Result<DemoCluster, String> {
    let bin = server_bin().ok_or(
        "no PostgreSQL server on this machine (./dev.sh demo installs it; or apt install postgresql)",
    )?;
    let user = server_user();
    if nix::unistd::geteuid().is_root() && user.is_none() {
        return Err("running as root and there is no `postgres` user to run the server as".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("sealgate-demo-pg")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let fail = |what: &str| format!("{what} failed (see {})", dir.join("server.log").display());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    if let Some(user) = &user {
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).map_err(|e| e.to_string())?;
    }
    let password = Secret::new(Zeroizing::new(format!(
        "pg-{}",
        &secrets::new_salt().map_err(|e| e.to_string())?[..16]
    )))
    .map_err(|e| e.to_string())?;
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, password.expose()).map_err(|e| e.to_string())?;
    if let Some(user) = &user {
        nix::unistd::chown(&pwfile, Some(user.uid), Some(user.gid)).map_err(|e| e.to_string())?;
    }
    let data = dir.join("data");
    let initdb = command(&bin.join("initdb"), &user)
        .args(["-A", "scram-sha-256", "-U", USER, "--no-sync", "-E", "UTF8"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .arg("-D")
        .arg(&data)
        .status();
    let _ = std::fs::remove_file(&pwfile);
    if !initdb.is_ok_and(|s| s.success()) {
        return Err(fail("initdb"));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let started = command(&bin.join("pg_ctl"), &user)
        .args(["-w", "-t", "30", "-l"])
        .arg(dir.join("server.log"))
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.display()
        ))
        .arg("-D")
        .arg(&data)
        .arg("start")
        .status();
    if !started.is_ok_and(|s| s.success()) {
        return Err(fail("starting the server"));
    }
    // The cluster goes when sealgate does, however it ends (a drain exits
    // the process directly): a watcher stops it and removes its files.
    let watcher = format!(
        "while test -d /proc/{pid}; do sleep 1; done; '{pg_ctl}' -D '{data}' -m immediate stop; rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display()
    );
    command(Path::new("/bin/sh"), &user)
        .arg("-c")
        .arg(watcher)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot watch the demo cluster: {e}"))?;
    let sealed = keyring
        .seal("pgdemo", "password", &password)
        .map_err(|e| e.to_string())?;
    Ok(DemoCluster {
        port,
        datasource: format!(
            "[datasources.pgdemo]\nurl = \"postgresql://127.0.0.1:{port}/postgres\"\n\
             sslmode = \"disable\"\n\
             credential = {{ kind = \"password\", username = \"{USER}\", password = \"{sealed}\" }}\n"
        ),
    })
}
