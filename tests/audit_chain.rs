//! The chained audit trail (SPEC 12), written by a running sealgate,
//! rotated by the test as logrotate does (move, then SIGHUP), across a
//! master key rotation; then tampered with in every way the issue names,
//! each caught by `sealgate audit verify` at the line where it happened.

mod common;

use std::path::{Path, PathBuf};

use common::*;

struct Trail {
    sg: Sealgate,
    config: PathBuf,
    /// Oldest first, as logrotate leaves them.
    files: Vec<PathBuf>,
}

fn verify(config: &Path, files: &[PathBuf]) -> (i32, String, String) {
    let mut args = vec![
        "audit".to_string(),
        "verify".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&args, b"")
}

/// Three files: requests, a rotation, a key rotation with another
/// rotation, more requests.
async fn chained_trail() -> Trail {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(dir.path());
    let sg = Sealgate::start_in(
        dir,
        &format!(
            "[audit]\noutput = \"audit.log\"\nchain = true\n{}\n[datasources.echo]\nurl = \"http://{}\"\n",
            keys.toml("k1"),
            up.addr
        ),
    );
    let log = sg.dir.path().join("audit.log");
    let requests = |n: usize| {
        let proxy = sg.proxy;
        async move {
            for i in 0..n {
                let resp = get(proxy, &format!("/echo/item/{i}")).await;
                assert_eq!(resp.status(), 200);
            }
        }
    };
    requests(5).await;
    sg.audit(5);
    let first = sg.dir.path().join("audit.log.1");
    std::fs::rename(&log, &first).unwrap();
    reload_and_wait(&sg, "ok", 1);
    requests(4).await;
    keys.add("k2");
    sg.edit_config("primary = \"k1\"", "primary = \"k2\"");
    sg.audit(4);
    let second = sg.dir.path().join("audit.log.2");
    std::fs::rename(&log, &second).unwrap();
    reload_and_wait(&sg, "ok", 2);
    requests(3).await;
    sg.audit(3);
    Trail {
        config: sg.dir.path().join("sealgate.toml"),
        files: vec![first, second, log],
        sg,
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// A copy of the series in a fresh directory, changed by `tamper`.
fn tampered(trail: &Trail, tamper: impl FnOnce(&[PathBuf])) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let copies: Vec<PathBuf> = trail
        .files
        .iter()
        .map(|f| {
            let copy = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &copy).unwrap();
            copy
        })
        .collect();
    tamper(&copies);
    (dir, copies)
}

fn assert_broken_at(trail: &Trail, files: &[PathBuf], at: &str) {
    let (code, out, err) = verify(&trail.config, files);
    assert_eq!(code, 1, "verified a tampered trail: {out}");
    assert!(err.contains(at), "expected the break at {at}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_chained_trail_verifies_and_every_tampering_is_named() {
    let trail = chained_trail().await;
    let all = lines(&trail.files[0]);
    assert!(all[0].contains("\"event\":\"chain_start\""), "{}", all[0]);
    assert!(all[0].contains(&format!("\"prev\":\"{}\"", "0".repeat(64))));
    assert!(all.iter().all(|l| l.contains(",\"chain\":\"")));
    let second = lines(&trail.files[1]);
    let last_of_first = all.last().unwrap();
    let value = &last_of_first[last_of_first.len() - 66..last_of_first.len() - 2];
    assert!(
        second[0].contains(&format!("\"prev\":\"{value}\"")),
        "the new file's chain_start names the last value: {}",
        second[0]
    );
    assert!(lines(&trail.files[2])[0].contains("\"key_id\":\"k2\""));

    let (code, out, err) = verify(&trail.config, &trail.files);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("in 3 files verified (keys k1, k2)"), "{out}");

    let name = |i: usize, line: usize| {
        format!(
            "{}:{line}:",
            trail.files[i].file_name().unwrap().to_str().unwrap()
        )
    };
    // One byte altered: the status of the third line.
    let (_d, files) = tampered(&trail, |f| {
        let mut l = lines(&f[0]);
        l[2] = l[2].replacen("\"status\":200", "\"status\":201", 1);
        write_lines(&f[0], &l);
    });
    assert_broken_at(&trail, &files, &name(0, 3));
    // A line deleted: the next one no longer continues from its value.
    let (_d, files) = tampered(&trail, |f| {
        let mut l = lines(&f[1]);
        l.remove(2);
        write_lines(&f[1], &l);
    });
    assert_broken_at(&trail, &files, &name(1, 3));
    // Two lines swapped.
    let (_d, files) = tampered(&trail, |f| {
        let mut l = lines(&f[0]);
        l.swap(2, 3);
        write_lines(&f[0], &l);
    });
    assert_broken_at(&trail, &files, &name(0, 3));
    // A forged line inserted, its chain value copied from a real one.
    let (_d, files) = tampered(&trail, |f| {
        let mut l = lines(&f[2]);
        let forged = l[1].replacen("/echo/item/0", "/echo/item/9", 1);
        l.insert(2, forged);
        write_lines(&f[2], &l);
    });
    assert_broken_at(&trail, &files, &name(2, 3));
    // The tail of a rotated file truncated by whole lines: the next file's
    // chain_start shows it.
    let (_d, files) = tampered(&trail, |f| {
        let mut l = lines(&f[0]);
        l.pop();
        write_lines(&f[0], &l);
    });
    assert_broken_at(&trail, &files, &name(1, 1));
    // The newest file cut in the middle of a line.
    let (_d, files) = tampered(&trail, |f| {
        let text = std::fs::read(&f[2]).unwrap();
        std::fs::write(&f[2], &text[..text.len() - 10]).unwrap();
    });
    let last = lines(&trail.files[2]).len();
    assert_broken_at(&trail, &files, &name(2, last));
    // The files given out of order.
    let swapped = vec![
        trail.files[1].clone(),
        trail.files[0].clone(),
        trail.files[2].clone(),
    ];
    assert_broken_at(&trail, &swapped, &name(0, 1));

    // Lines under a key verify only while the key is in the directory.
    std::fs::remove_file(trail.sg.dir.path().join("keys/k1.key")).unwrap();
    let (code, _, err) = verify(&trail.config, &trail.files);
    assert_eq!(code, 1);
    assert!(
        err.contains("key id \"k1\" is not in the key directory"),
        "{err}"
    );
    let (code, out, err) = verify(&trail.config, &trail.files[2..]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("continues a chain from an earlier file"),
        "{out}"
    );
}

/// A restart continues the chain: appending to the same file, and on a
/// new file when the old one was rotated away while sealgate was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_chain() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(dir.path());
    let extra = format!(
        "[audit]\noutput = \"audit.log\"\nchain = true\n{}\n[datasources.echo]\nurl = \"http://{}\"\n",
        keys.toml("k1"),
        up.addr
    );
    let mut dir = dir;
    for round in 1..=3 {
        let mut sg = Sealgate::start_in(dir, &extra);
        assert_eq!(get(sg.proxy, "/echo/a").await.status(), 200);
        sg.audit(1);
        sg.signal(nix::sys::signal::Signal::SIGTERM);
        sg.wait_exit(std::time::Duration::from_secs(10));
        dir = std::mem::replace(&mut sg.dir, tempfile::tempdir().unwrap());
        if round == 2 {
            std::fs::rename(dir.path().join("audit.log"), dir.path().join("audit.log.1")).unwrap();
        }
    }
    let files = [dir.path().join("audit.log.1"), dir.path().join("audit.log")];
    let starts: usize = files
        .iter()
        .map(|f| {
            lines(f)
                .iter()
                .filter(|l| l.contains("\"event\":\"chain_start\""))
                .count()
        })
        .sum();
    assert_eq!(starts, 3);
    let (code, out, err) = verify(&dir.path().join("sealgate.toml"), &files);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("earlier file"), "{out}");
}

#[test]
fn chain_without_keys_is_a_config_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sealgate.toml");
    std::fs::write(
        &path,
        "[audit]\noutput = \"audit.log\"\nchain = true\n[datasources.a]\nurl = \"https://example.com\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&path);
    assert_eq!(code, 1);
    assert!(
        err.contains(":3: audit.chain: needs a [keys] table"),
        "{err}"
    );
}
