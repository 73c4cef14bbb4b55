#!/usr/bin/env bash
# benches/ab.sh: two sealgates, A and B, measured in one run. They differ
# in build (A_BIN, B_BIN; by default both the shipped build) or in whether
# they scrub response bodies (A_SCRUB, B_SCRUB: on or off). Both are pinned
# to CPU 1, nginx and the clients to CPU 0. Rounds alternate A and B, so the
# drift of a shared machine falls on both alike; separate runs on this
# machine differ by more than most changes do. Per round and size in SIZES,
# wrk's GETs ($CONNS connections, $DURATION s, over TLS to sealgate with
# TLS=1) give sealgate's CPU seconds per 10k requests and the p99; with
# STREAM=1 one $BIG_MIB MiB GET with curl gives MB/s and CPU seconds per
# GiB (at most $STREAM_RATE, curl's --limit-rate, if set). Prints every round,
# the medians, and A against B round by round, under the names A_NAME and
# B_NAME (default A and B).
#
#   A_BIN=/tmp/sealgate-before benches/ab.sh        # B: the shipped build
#   SIZES="1k 64k" TLS=1 ROUNDS=10 DURATION=3 A_BIN=... B_BIN=... benches/ab.sh
#   A_SCRUB=on B_SCRUB=off STREAM=1 benches/ab.sh   # benches/scrub_ab.sh
#
# The secret is peerbench's (`test`). Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-7} DURATION=${DURATION:-5} CONNS=${CONNS:-50} SIZES=${SIZES:-64k}
TLS=${TLS:-0} STREAM=${STREAM:-0} A_NAME=${A_NAME:-A} B_NAME=${B_NAME:-B}
[[ $STREAM == 1 ]] && export BIG_MIB=${BIG_MIB:-256}
for tool in wrk nginx openssl taskset curl; do
  command -v "$tool" >/dev/null || { echo "ab.sh needs $tool" >&2; exit 1; }
done
source benches/bench_setup.sh
bench_workdir ab
bench_cert "$work"
bench_upstream "$work" 0

shipped=
[[ -n ${A_BIN:-} && -n ${B_BIN:-} ]] || shipped=$(bench_binary)
declare -A pid_of url_of
for side in A B; do
  bin_var=${side}_BIN scrub_var=${side}_SCRUB
  bin=${!bin_var:-$shipped} scrub=${!scrub_var:-on}
  port=18083
  [[ $side == B ]] && port=18086
  mkdir -p "$work/$side"
  cp "$work/cert.pem" "$work/key.pem" "$work/$side/"
  SCRUB=$scrub SG_PORT=$port SG_TLS_PORT=$((port + 361)) SG_ADMIN_PORT=$((port + 907)) \
    bench_setup "$work/$side" "$bin"
  bench_start "$work/$side" 1 "$port"
  pid_of[$side]=$sg_pid
  url_of[$side]="http://127.0.0.1:$port/bench"
  [[ $TLS == 1 ]] && url_of[$side]="https://127.0.0.1:$((port + 361))/bench"
  for size in $SIZES; do
    taskset -c 0 wrk -t1 -c"$CONNS" -d2s "${url_of[$side]}/$size.bin" >/dev/null
  done
  echo "$side: $bin, scrubbing $scrub" >&2
done

# wrk's 99th percentile, in ms whatever unit wrk printed it in.
p99_ms() {
  awk '$1 == "99%" {
    v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v)
    printf "%.2f", v * (unit == "us" ? 0.001 : unit == "s" ? 1000 : 1) }'
}
results=()
for round in $(seq "$ROUNDS"); do
  for size in $SIZES; do
    for side in A B; do
      name_var=${side}_NAME
      before=$(cpu_ticks "${pid_of[$side]}")
      out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${url_of[$side]}/$size.bin")
      after=$(cpu_ticks "${pid_of[$side]}")
      if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
        echo "errors during ${!name_var}'s $size run:" >&2
        echo "$out" >&2
        exit 1
      fi
      requests=$(awk '/requests in/ {print $1}' <<<"$out")
      p99=$(p99_ms <<<"$out")
      cpu=$(awk -v t=$((after - before)) -v n="$requests" -v hz="$hz" \
        'BEGIN { printf "%.3f", t / hz / n * 10000 }')
      mbps=- gib_cpu=- stream=
      if [[ $STREAM == 1 && $size == "${SIZES%% *}" ]]; then
        before=$(cpu_ticks "${pid_of[$side]}")
        mbps=$(taskset -c 0 curl -fsk ${STREAM_RATE:+--limit-rate "$STREAM_RATE"} -o /dev/null -w '%{speed_download}' "${url_of[$side]}/big.bin" |
          awk '{printf "%.0f", $1 / 1e6}')
        after=$(cpu_ticks "${pid_of[$side]}")
        gib_cpu=$(awk -v t=$((after - before)) -v hz="$hz" -v mib="$BIG_MIB" \
          'BEGIN { printf "%.3f", t / hz / (mib / 1024) }')
        stream=", $BIG_MIB MiB at $mbps MB/s, $gib_cpu CPU s/GiB"
      fi
      echo "round $round, $size, ${!name_var}: $cpu CPU s/10k requests, p99 $p99 ms ($requests requests)$stream"
      results+=("$size $side $cpu $p99 $mbps $gib_cpu")
    done
  done
done

python3 - "$A_NAME" "$B_NAME" "${results[@]}" <<'PY'
import statistics, sys
a_name, b_name = sys.argv[1:3]
rows = [arg.split() for arg in sys.argv[3:]]
for size in dict.fromkeys(r[0] for r in rows):
    a = [r for r in rows if r[0] == size and r[1] == "A"]
    b = [r for r in rows if r[0] == size and r[1] == "B"]
    def median(side, column):
        return statistics.median(float(r[column]) for r in side)
    ca, cb = median(a, 2), median(b, 2)
    print(f"{size} CPU s/10k requests, medians: {a_name} {ca:.3f}, {b_name} {cb:.3f}, "
          f"{a_name}/{b_name} {ca / cb:.3f}")
    pairs = [float(x[2]) / float(y[2]) for x, y in zip(a, b)]
    print(f"{size} CPU {a_name}/{b_name} round by round: "
          + ", ".join(f"{p:.3f}" for p in pairs) + f" (median {statistics.median(pairs):.3f})")
    pa, pb = median(a, 3), median(b, 3)
    print(f"{size} p99 ms, medians: {a_name} {pa:.2f}, {b_name} {pb:.2f}, {a_name}/{b_name} {pa / pb:.3f}")
    if a[0][4] != "-":
        ma, mb = median(a, 4), median(b, 4)
        print(f"stream MB/s, medians: {a_name} {ma:.0f}, {b_name} {mb:.0f}, {a_name}/{b_name} {ma / mb:.3f}")
        ga, gb = median(a, 5), median(b, 5)
        print(f"stream CPU s/GiB, medians: {a_name} {ga:.3f}, {b_name} {gb:.3f}, {a_name}/{b_name} {ga / gb:.3f}")
PY
