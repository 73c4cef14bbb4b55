#!/usr/bin/env bash
# benches/mysqlbench.sh: the MySQL front next to HAProxy in TCP mode (the
# floor for any proxy) and a direct connection to MariaDB, in one run with
# alternating rounds:
#   - point selects (prepared, by primary key) from 1 and from 20
#     connections (examples/mysql_load.rs): queries/s, p50/p99 latency,
#     proxy CPU per query (user+system time of the proxy process);
#   - a 256 MiB result set read by the same client: MB/s and the
#     proxy's peak RSS growth.
# Each proxy runs pinned to core 1 (sealgate with threads = 1, HAProxy with
# one thread); MariaDB and the clients share core 0. Every leg is plain TCP
# on loopback, so the figures compare relaying, not TLS.
#
#   benches/mysqlbench.sh                        # release build (./dev.sh release)
#   SEALGATE_BIN=target/release/sealgate ROUNDS=5 SECONDS_PER_RUN=10 benches/mysqlbench.sh
#
# Installs what is missing (MariaDB, haproxy) through `./dev.sh
# bench-setup`. As root the server runs as the `mysql` user.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
RESULT_MIB=${RESULT_MIB:-256}
ROWS=10000

source benches/bench_setup.sh
./dev.sh bench-setup >/dev/null
BIN=$(bench_binary)
# The load client, optimised but without the release profile's fat LTO.
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release --locked --example mysql_load --target-dir target/bench-client >&2
LOAD=$PWD/target/bench-client/release/examples/mysql_load
bench_workdir mysqlbench
chmod 755 "$work"
as_mysql() { if [[ $(id -u) == 0 ]]; then runuser -u mysql -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
db_port=$(free_port); sg_port=$(free_port); admin_port=$(free_port); proxy_port=$(free_port)
haproxy_port=$(free_port)
password=bench-$(head -c 12 /dev/urandom | base64 | tr -dc 'a-zA-Z0-9')

# MariaDB on core 0.
mkdir -p "$work/db" && chown mysql "$work/db" 2>/dev/null || true
as_mysql mariadb-install-db --no-defaults --auth-root-authentication-method=normal --skip-test-db \
  --datadir="$work/db/data" >/dev/null 2>&1
as_mysql taskset -c 0 mariadbd --no-defaults --datadir="$work/db/data" --socket="$work/db/sock" \
  --port="$db_port" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
  --innodb-buffer-pool-size=128M --max-connections=200 --pid-file="$work/db/pid" 2>"$work/db/log" &
db_pid=$!
# runuser stays as mariadbd's parent: the server is stopped by its own pid,
# and waited for, before its data directory goes.
cleanup_db() {
  local server
  server=$(cat "$work/db/pid" 2>/dev/null || true)
  if [[ -n $server ]]; then
    kill "$server" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
  fi
  kill "$db_pid" 2>/dev/null || true
  bench_cleanup
}
trap cleanup_db EXIT
for _ in $(seq 100); do
  mariadb-admin --socket="$work/db/sock" -u root ping >/dev/null 2>&1 && break
  sleep 0.2
done
mariadb --socket="$work/db/sock" -u root -e "
  CREATE DATABASE bench;
  CREATE USER bench@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('$password');
  GRANT ALL ON bench.* TO bench@'127.0.0.1';
  USE bench;
  CREATE TABLE kv (id INT PRIMARY KEY, v VARCHAR(100));
  INSERT INTO kv SELECT seq, REPEAT('v', 64) FROM seq_1_to_$ROWS;"

# sealgate
mkdir -p "$work/keys"
"$BIN" keygen --out "$work/keys/k1.key" 2>/dev/null
printf '[keys]\ndir = "%s/keys"\nprimary = "k1"\nsalt = "%s"\n' "$work" "$("$BIN" salt)" >"$work/keys.toml"
sealed=$(printf '%s' "$password" | "$BIN" seal -c "$work/keys.toml" --datasource bench --field password)
bench_policy "$work/policies" "$db_port"
cat >"$work/sealgate.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$proxy_port"]
threads = 1
[admin]
listen = "127.0.0.1:$admin_port"
[audit]
output = "$work/audit.log"
[policy]
dir = "$work/policies"
[mysql]
listen = ["127.0.0.1:$sg_port"]
$(cat "$work/keys.toml")
[datasources.bench]
url = "mysql://127.0.0.1:$db_port/bench"
ssl_mode = "disabled"
credential = { kind = "password", username = "bench", password = "$sealed" }
TOML
RUST_LOG=warn taskset -c 1 "$BIN" run -c "$work/sealgate.toml" >/dev/null 2>"$work/sealgate.err" & pids+=($!)
sg_pid=$!

# HAProxy, TCP mode, one thread.
cat >"$work/haproxy.cfg" <<CFG
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen db
  bind 127.0.0.1:$haproxy_port
  server db 127.0.0.1:$db_port
CFG
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
haproxy_pid=$!
sleep 1

declare -A port=([direct]=$db_port [sealgate]=$sg_port [haproxy]=$haproxy_port)
declare -A pid=([direct]= [sealgate]=$sg_pid [haproxy]=$haproxy_pid)
hwm_kib() { [[ -n $1 ]] && awk '/VmHWM/ {print $2}' "/proc/$1/status" || echo 0; }
# sealgate's callers log in as `app` with no password: it holds the sealed one.
url_for() {
  if [[ $1 == sealgate ]]; then
    echo "mysql://app@127.0.0.1:${port[$1]}/bench"
  else
    echo "mysql://bench:$password@127.0.0.1:${port[$1]}/bench"
  fi
}

results="$work/results"
: >"$results"
for round in $(seq "$ROUNDS"); do
  for target in direct sealgate haproxy; do
    # The big result first: the RSS growth is from the proxy at rest.
    hwm_before=$(hwm_kib "${pid[$target]}")
    eval "$(MYSQL_URL=$(url_for "$target") taskset -c 0 "$LOAD" result "$RESULT_MIB")"
    hwm_after=$(hwm_kib "${pid[$target]}")
    mbs=$(awk -v b="$bytes" -v s="$seconds" 'BEGIN {printf "%.0f", b / 1048576 / s}')
    echo "$round result $target mb_s=$mbs rss_growth_kib=$((hwm_after - hwm_before)) peak_rss_kib=$hwm_after" | tee -a "$results"
    for connections in 1 20; do
      before=$(cpu_ticks "${pid[$target]}")
      out=$(MYSQL_URL=$(url_for "$target") taskset -c 0 "$LOAD" "$connections" "$SECONDS_PER_RUN" "$ROWS")
      after=$(cpu_ticks "${pid[$target]}")
      eval "$out"
      cpu_us=$(awk -v t="$((after - before))" -v hz="$hz" -v n="$queries" 'BEGIN {printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0)}')
      qps=$(awk -v n="$queries" -v s="$SECONDS_PER_RUN" 'BEGIN {printf "%.0f", n / s}')
      echo "$round select-$connections $target qps=$qps p50_us=$p50_us p99_us=$p99_us cpu_us_per_query=$cpu_us" | tee -a "$results"
    done
  done
done

echo
echo "medians over $ROUNDS rounds (CPU per query in µs of proxy time; ratios against HAProxy):"
python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    fields = dict(p.split("=") for p in parts[3:])
    rows[(parts[1], parts[2])].append({k: float(v) for k, v in fields.items()})
def med(scenario, target, key):
    return statistics.median(r[key] for r in rows[(scenario, target)])
for scenario in ("select-1", "select-20"):
    print(f"\n{scenario}:")
    for target in ("direct", "sealgate", "haproxy"):
        print(f"  {target:9} qps {med(scenario, target, 'qps'):8.0f}  p50 {med(scenario, target, 'p50_us'):6.0f} µs"
              f"  p99 {med(scenario, target, 'p99_us'):6.0f} µs  cpu/query {med(scenario, target, 'cpu_us_per_query'):6.2f} µs")
    sg = {k: med(scenario, "sealgate", k) for k in ("qps", "p99_us", "cpu_us_per_query")}
    print(f"  sealgate/haproxy: cpu/query {sg['cpu_us_per_query'] / med(scenario, 'haproxy', 'cpu_us_per_query'):.2f}x"
          f"  p99 {sg['p99_us'] / med(scenario, 'haproxy', 'p99_us'):.2f}x  qps {sg['qps'] / med(scenario, 'haproxy', 'qps'):.2f}x")
print("\nresult set:")
for target in ("direct", "sealgate", "haproxy"):
    print(f"  {target:9} {med('result', target, 'mb_s'):6.0f} MB/s  peak RSS growth {med('result', target, 'rss_growth_kib') / 1024:5.1f} MiB")
print(f"  sealgate/haproxy MB/s: {med('result', 'sealgate', 'mb_s') / med('result', 'haproxy', 'mb_s'):.2f}x")
PY
