#!/usr/bin/env bash
# benches/pgbench.sh: the PostgreSQL front next to PgBouncer (session
# pooling) and HAProxy in TCP mode (the floor for any proxy), and a direct
# connection, in one run with alternating rounds:
#   - pgbench -S -M prepared, 1 client and 20 clients: TPS, p50/p99
#     latency (from pgbench's per-transaction log), proxy CPU per
#     transaction (user+system time of the proxy process);
#   - COPY (256 MiB) TO STDOUT through psql: MB/s and the proxy's peak RSS
#     growth.
# Each proxy runs pinned to core 1 (sealgate with threads = 1, HAProxy
# with one thread, PgBouncer is single-threaded); PostgreSQL and the
# clients share core 0. Every leg is plain TCP on loopback, so the
# figures compare relaying, not TLS.
#
#   benches/pgbench.sh                         # release build (./dev.sh release)
#   SEALGATE_BIN=target/release/sealgate ROUNDS=5 SECONDS_PER_RUN=10 benches/pgbench.sh
#   PERF=1 benches/pgbench.sh   # then where sealgate's and PgBouncer's time goes at
#                               # 20 clients (perf, cpu-clock samples, self time)
#
# Installs what is missing (PostgreSQL, pgbouncer, haproxy) through
# `./dev.sh bench-setup`. Runs as root: the server and
# PgBouncer run as the `postgres` user.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
COPY_MIB=${COPY_MIB:-256}

source benches/bench_setup.sh
./dev.sh bench-setup >/dev/null
BIN=$(bench_binary)
bench_workdir pgbench
chmod 755 "$work"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port); sg_port=$(free_port); admin_port=$(free_port); proxy_port=$(free_port)
bouncer_port=$(free_port); haproxy_port=$(free_port)
password=bench-$(head -c 12 /dev/urandom | base64 | tr -dc 'a-zA-Z0-9')

# PostgreSQL on core 0, SCRAM for the bench user.
mkdir -p "$work/pg" && chown postgres "$work/pg" 2>/dev/null || true
printf '%s' "$password" >"$work/pwfile"; chown postgres "$work/pwfile" 2>/dev/null || true
as_pg "$pgbin/initdb" -A scram-sha-256 -U bench --pwfile="$work/pwfile" --no-sync -D "$work/pg/data" >/dev/null
as_pg taskset -c 0 "$pgbin/pg_ctl" -w -l "$work/pg/log" -D "$work/pg/data" \
  -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100" start >/dev/null
# PgBouncer runs under runuser: its own pid is found once it is up.
cleanup_pg() {
  [[ -n ${bouncer_pid:-} ]] && kill "$bouncer_pid" 2>/dev/null
  as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  bench_cleanup
}
trap cleanup_pg EXIT
export PGPASSWORD=$password
pgbench -i -s 10 -q -h 127.0.0.1 -p "$pg_port" -U bench postgres >/dev/null 2>&1

# sealgate
mkdir -p "$work/keys"
"$BIN" keygen --out "$work/keys/k1.key" 2>/dev/null
printf '[keys]\ndir = "%s/keys"\nprimary = "k1"\nsalt = "%s"\n' "$work" "$("$BIN" salt)" >"$work/keys.toml"
sealed=$(printf '%s' "$password" | "$BIN" seal -c "$work/keys.toml" --datasource postgres --field password)
bench_policy "$work/policies" "$pg_port"
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
[postgres]
listen = ["127.0.0.1:$sg_port"]
$(cat "$work/keys.toml")
[datasources.postgres]
url = "postgresql://127.0.0.1:$pg_port/postgres"
sslmode = "disable"
credential = { kind = "password", username = "bench", password = "$sealed" }
TOML
RUST_LOG=warn taskset -c 1 "$BIN" run -c "$work/sealgate.toml" >/dev/null 2>"$work/sealgate.err" & pids+=($!)
sg_pid=$!

# PgBouncer: session pooling, clients trusted (as sealgate trusts loopback).
cat >"$work/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 40
logfile = $work/pg/pgbouncer.log
unix_socket_dir =
INI
printf '"bench" "%s"\n' "$password" >"$work/userlist.txt"
chown postgres "$work/pgbouncer.ini" "$work/userlist.txt" 2>/dev/null || true
as_pg taskset -c 1 pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 & pids+=($!)

# HAProxy, TCP mode, one thread.
cat >"$work/haproxy.cfg" <<CFG
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen pg
  bind 127.0.0.1:$haproxy_port
  server pg 127.0.0.1:$pg_port
CFG
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
sleep 1
bouncer_pid=$(pgrep -n -x pgbouncer)
haproxy_pid=$(pgrep -n -x haproxy)

declare -A port=([direct]=$pg_port [sealgate]=$sg_port [pgbouncer]=$bouncer_port [haproxy]=$haproxy_port)
declare -A pid=([direct]= [sealgate]=$sg_pid [pgbouncer]=$bouncer_pid [haproxy]=$haproxy_pid)
hwm_kib() { [[ -n $1 ]] && awk '/VmHWM/ {print $2}' "/proc/$1/status" || echo 0; }
user_for() { [[ $1 == sealgate ]] && echo app || echo bench; }

results="$work/results"
: >"$results"
for round in $(seq "$ROUNDS"); do
  for target in direct sealgate pgbouncer haproxy; do
    for clients in 1 20; do
      rm -f "$work"/pgbench_log.*
      before=$(cpu_ticks "${pid[$target]}")
      out=$(cd "$work" && taskset -c 0 pgbench -n -S -M prepared -c "$clients" -j "$clients" -T "$SECONDS_PER_RUN" \
        -l --log-prefix=pgbench_log -h 127.0.0.1 -p "${port[$target]}" -U "$(user_for "$target")" postgres 2>&1)
      after=$(cpu_ticks "${pid[$target]}")
      tx=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out" | cut -d/ -f1)
      tps=$(awk '/^tps/ {print $3; exit}' <<<"$out")
      read -r p50 p99 < <(cat "$work"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.5)], a[int(NR*0.99)]}')
      cpu_us=$(awk -v t="$((after - before))" -v hz="$hz" -v n="$tx" 'BEGIN {printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0)}')
      echo "$round pgbench-$clients $target tps=$tps p50_us=$p50 p99_us=$p99 cpu_us_per_tx=$cpu_us" | tee -a "$results"
    done
    hwm_before=$(hwm_kib "${pid[$target]}")
    start=$(date +%s.%N)
    bytes=$(taskset -c 0 psql -X -q -h 127.0.0.1 -p "${port[$target]}" -U "$(user_for "$target")" -d postgres \
      -c "COPY (SELECT repeat('x', 1023) FROM generate_series(1, $((COPY_MIB * 1024)))) TO STDOUT" | wc -c)
    end=$(date +%s.%N)
    hwm_after=$(hwm_kib "${pid[$target]}")
    mbs=$(awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN {printf "%.0f", b / 1048576 / (e - s)}')
    echo "$round copy $target mb_s=$mbs rss_growth_kib=$((hwm_after - hwm_before)) peak_rss_kib=$hwm_after" | tee -a "$results"
  done
done

if [[ ${PERF:-0} == 1 ]]; then
  for target in sealgate pgbouncer; do
    perf record -q -e cpu-clock -g -p "${pid[$target]}" -o "$work/$target.perf" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
    recorder=$!
    taskset -c 0 pgbench -n -S -M prepared -c 20 -j 20 -T "$SECONDS_PER_RUN" \
      -h 127.0.0.1 -p "${port[$target]}" -U "$(user_for "$target")" postgres >/dev/null 2>&1
    wait "$recorder" || true
    echo
    echo "$target at 20 clients, share of its CPU samples by where they were spent (self):"
    perf report -i "$work/$target.perf" --no-children --sort dso,sym --stdio 2>/dev/null \
      | grep -E '^ +[0-9.]+%' | head -25 || true
  done
fi

echo
echo "medians over $ROUNDS rounds (CPU per transaction in µs of proxy time; ratios against PgBouncer and HAProxy):"
python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    fields = dict(p.split("=") for p in parts[3:])
    rows[(parts[1], parts[2])].append({k: float(v) for k, v in fields.items()})
def med(scenario, target, key):
    return statistics.median(r[key] for r in rows[(scenario, target)])
for scenario in ("pgbench-1", "pgbench-20"):
    print(f"\n{scenario}:")
    for target in ("direct", "sealgate", "pgbouncer", "haproxy"):
        print(f"  {target:10} tps {med(scenario, target, 'tps'):9.0f}  p50 {med(scenario, target, 'p50_us'):6.0f} µs"
              f"  p99 {med(scenario, target, 'p99_us'):6.0f} µs  cpu/tx {med(scenario, target, 'cpu_us_per_tx'):6.2f} µs")
    sg = {k: med(scenario, "sealgate", k) for k in ("tps", "p99_us", "cpu_us_per_tx")}
    for peer in ("pgbouncer", "haproxy"):
        print(f"  sealgate/{peer}: cpu/tx {sg['cpu_us_per_tx'] / med(scenario, peer, 'cpu_us_per_tx'):.2f}x"
              f"  p99 {sg['p99_us'] / med(scenario, peer, 'p99_us'):.2f}x  tps {sg['tps'] / med(scenario, peer, 'tps'):.2f}x")
print("\ncopy:")
for target in ("direct", "sealgate", "pgbouncer", "haproxy"):
    print(f"  {target:10} {med('copy', target, 'mb_s'):6.0f} MB/s  peak RSS growth {med('copy', target, 'rss_growth_kib') / 1024:5.1f} MiB")
print(f"  sealgate/pgbouncer MB/s: {med('copy', 'sealgate', 'mb_s') / med('copy', 'pgbouncer', 'mb_s'):.2f}x")
PY
