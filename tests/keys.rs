//! The key directory as a local attacker or a careless operator leaves it:
//! writable by others, keys owned by someone else, a FIFO or a symlink in
//! place of a key, a salt not made at random. Each is refused by `check`
//! (and so by `run`), at once and naming what is wrong; and `reseal`
//! through a symlinked config rewrites the target, keeping owner and mode.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;

/// A config with keys and one sealed credential; `check` passes on it.
fn fixture() -> (tempfile::TempDir, Keys, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, keys.toml("k1")).unwrap();
    let sealed = seal(&config, "pay", "token", "tok-1234");
    std::fs::write(
        &config,
        format!(
            "{}\n[datasources.pay]\nurl = \"https://example.com\"\n\
             credential = {{ kind = \"bearer\", token = \"{sealed}\" }}\n\
             [policy]\ndir = \"policies\"\n",
            keys.toml("k1")
        ),
    )
    .unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.toml"),
        "[egress]\nallow = [\"example.com:443\"]\n",
    )
    .unwrap();
    let (code, out, err) = check_config(&config);
    assert_eq!(code, 0, "{out}{err}");
    (dir, keys, config)
}

/// `check` must fail within a few seconds, saying `expected`.
fn refused(config: &Path, expected: &str) {
    let started = Instant::now();
    let (code, out, err) = check_config(config);
    assert!(started.elapsed() < Duration::from_secs(5), "check hung");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(expected), "`{expected}` not in:\n{err}");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_key_directory_others_can_write_is_refused() {
    for mode in [0o775, 0o757, 0o1777, 0o770] {
        let (_dir, keys, config) = fixture();
        chmod(&keys.dir, mode);
        refused(&config, "writable by its group or others");
    }
}

#[test]
fn a_key_or_key_directory_owned_by_another_user_is_refused() {
    assert!(
        running_as_root(),
        "this test gives files away with chown: run it as root, as CI does"
    );
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    let (_dir, keys, config) = fixture();
    nix::unistd::chown(&keys.dir.join("k1.key"), nobody, None).unwrap();
    refused(&config, "owned by uid 65534");
    let (_dir, keys, config) = fixture();
    nix::unistd::chown(&keys.dir, nobody, None).unwrap();
    refused(&config, "owned by uid 65534");
}

#[test]
fn a_fifo_named_like_a_key_is_refused_without_hanging() {
    let (_dir, keys, config) = fixture();
    nix::unistd::mkfifo(
        &keys.dir.join("k2.key"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    refused(&config, "is not a regular file");
}

#[test]
fn a_symlinked_key_is_judged_by_its_target_and_the_targets_directory() {
    // A Secret volume's layout: k1.key -> ..data/k1.key, judged like a key.
    let (dir, keys, config) = fixture();
    let data = dir.path().join("keys-data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    std::fs::rename(keys.dir.join("k1.key"), data.join("k1.key")).unwrap();
    std::os::unix::fs::symlink(data.join("k1.key"), keys.dir.join("k1.key")).unwrap();
    let (code, out, err) = check_config(&config);
    assert_eq!(code, 0, "a sound symlinked key loads: {out}{err}");

    chmod(&data.join("k1.key"), 0o644);
    refused(&config, "readable or writable by others");
    chmod(&data.join("k1.key"), 0o600);
    chmod(&data, 0o777);
    refused(&config, "writable by its group or others");
}

#[test]
fn a_salt_not_made_at_random_is_refused() {
    for salt in [
        STANDARD.encode([0u8; 32]),
        STANDARD.encode([0x41u8; 32]),
        STANDARD.encode([1u8, 2, 3, 4].repeat(8)),
    ] {
        let (_dir, keys, config) = fixture();
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace(&keys.salt, &salt)).unwrap();
        refused(&config, "distinct byte values");
    }
}

#[test]
fn reseal_through_a_symlinked_config_rewrites_the_target_keeping_owner_and_mode() {
    let (dir, keys, config) = fixture();
    let real = dir.path().join("deploy");
    std::fs::create_dir(&real).unwrap();
    let target = real.join("sealgate.toml");
    // Relative paths in the config are relative to the file as named.
    std::fs::rename(&config, &target).unwrap();
    std::os::unix::fs::symlink(&target, &config).unwrap();
    chmod(&target, 0o640);
    if running_as_root() {
        nix::unistd::chown(&target, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    }
    let before = std::fs::metadata(&target).unwrap();
    keys.add("k2");
    let text = std::fs::read_to_string(&target).unwrap();
    std::fs::write(
        &target,
        text.replace("primary = \"k1\"", "primary = \"k2\""),
    )
    .unwrap();

    let (code, _, err) = run_cli(&["reseal", "-c", config.to_str().unwrap()], b"");
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::symlink_metadata(&config)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the config is still a symlink"
    );
    assert!(std::fs::read_to_string(&target)
        .unwrap()
        .contains("sealed:v1:k2:"));
    let after = std::fs::metadata(&target).unwrap();
    assert_eq!(after.mode() & 0o7777, 0o640);
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    let leftovers: Vec<_> = std::fs::read_dir(&real).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
}
