#!/usr/bin/env bash
# benches/footprint.sh: what one sealgate holds at rest and how fast it is
# ready (issue 22), for two configs: the minimal one (one data source, no
# TLS listener) and the peer benchmark's (TLS listener, sealed credential,
# audit file, policy). For each, ROUNDS starts of the build to ship:
# milliseconds from spawn to the first `/readyz` 200, then, after SETTLE
# seconds at rest, resident memory split as the kernel counts it (VmRSS,
# anonymous, file-backed), VmHWM and the thread count. Medians and ranges.
# Memory under load and tail latency are the peer benchmark's
# (benches/peerbench.sh: peak RSS per scenario, p99).
#
#   benches/footprint.sh
#   ROUNDS=10 SETTLE=5 benches/footprint.sh
#   SEALGATE_BIN=target/release/sealgate benches/footprint.sh
#
# Everything stays on 127.0.0.1; every process started here is ended.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-5}
SETTLE=${SETTLE:-2}

source benches/bench_setup.sh
SG=$(bench_binary)
bench_workdir footprint
bench_setup "$work" "$SG"

# The minimal config: loopback, one data source, no credential, no TLS.
mkdir -p "$work/minimal"
cat >"$work/minimal/sealgate.toml" <<TOML
[proxy]
listen = ["127.0.0.1:18083"]
[admin]
listen = "127.0.0.1:18990"
[audit]
output = "$work/minimal/audit.log"
[datasources.bench]
url = "http://127.0.0.1:18080"
TOML

# The benchmark config needs a certificate where peerbench would give one.
bench_cert "$work"

python3 - "$SG" "$work" "$ROUNDS" "$SETTLE" <<'PY'
import os, socket, statistics, subprocess, sys, time

sg, work, rounds, settle = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

def ready():
    try:
        with socket.create_connection(("127.0.0.1", 18990), timeout=0.2) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()[0] if value.split() else ""
    return fields

def start(cmd, env):
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready():
        if proc.poll() is not None:
            sys.exit(f"sealgate exited ({proc.returncode}) before it was ready: {cmd}")
        if time.monotonic() - began > 10:
            sys.exit("sealgate was not ready within 10 s")
        time.sleep(0.0005)
    return proc, (time.monotonic() - began) * 1000

configs = [
    ("minimal (no TLS listener)", [sg, "run", "-c", f"{work}/minimal/sealgate.toml"], {}),
    ("benchmark (TLS listener, sealed credential)", ["bash", f"{work}/start.sh"],
     {"PB_UPSTREAM": "127.0.0.1:18080", "PB_CERT": f"{work}/cert.pem", "PB_KEY": f"{work}/key.pem"}),
]
print(f"footprint: {sg}, {rounds} starts per config, {settle:g} s at rest before reading memory\n")
print("| config | ready ms | VmRSS MiB | anonymous MiB | file MiB | VmHWM MiB | threads |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, cmd, extra in configs:
    env = dict(os.environ, RUST_LOG="warn", **extra)
    rows = []
    for _ in range(rounds):
        proc, ms = start(cmd, env)
        time.sleep(settle)
        # start.sh execs sealgate, so the pid is sealgate's own.
        st = status(proc.pid)
        mib = lambda k: int(st.get(k, "0")) / 1024
        rows.append((ms, mib("VmRSS"), mib("RssAnon"), mib("RssFile"), mib("VmHWM"), int(st["Threads"])))
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.2)
    cols = list(zip(*rows))
    cell = lambda c, fmt: f"{fmt(statistics.median(c))} ({fmt(min(c))}–{fmt(max(c))})"
    f1 = lambda v: f"{v:.1f}"
    print(f"| {name} | {cell(cols[0], f1)} | {cell(cols[1], f1)} | {cell(cols[2], f1)} | "
          f"{cell(cols[3], f1)} | {cell(cols[4], f1)} | {cell(cols[5], lambda v: str(int(v)))} |")
PY
