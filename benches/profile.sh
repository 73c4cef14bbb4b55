#!/usr/bin/env bash
# benches/profile.sh: where sealgate's CPU goes per request. The release
# build runs with the production-like config of peerbench.sh, pinned to
# CPU 1; wrk (and an nginx upstream) load it from CPU 0; perf samples
# sealgate alone and prints its hottest symbols, and the CPU seconds per
# 10k requests of the run. With CALLGRIND=1, sealgate runs under valgrind's
# callgrind instead and the script prints instructions per request under
# the same load, which a noisy machine does not change, and sealgate's own
# hooks among them.
#
#   benches/profile.sh                 # 1 KiB GET over plain HTTP
#   SIZE=64k benches/profile.sh        # 64 KiB GET
#   TLS=1 benches/profile.sh           # 1 KiB GET over TLS to sealgate
#   PERF=0 benches/profile.sh          # CPU per request only, no perf
#   CALLGRIND=1 DURATION=20 benches/profile.sh   # instructions per request
#
# Needs perf (or valgrind), wrk, nginx and openssl. Everything stays on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-1k} TLS=${TLS:-0} DURATION=${DURATION:-10} CONNS=${CONNS:-50} PERF=${PERF:-1}
CALLGRIND=${CALLGRIND:-0}
for tool in wrk nginx openssl taskset; do
  command -v "$tool" >/dev/null || { echo "profile.sh needs $tool" >&2; exit 1; }
done
source benches/bench_setup.sh
SG=$(bench_binary)
bench_workdir profile
bench_setup "$work" "$SG"
bench_cert "$work"
bench_upstream "$work" 0
if [[ $CALLGRIND == 1 ]]; then
  command -v valgrind >/dev/null || { echo "CALLGRIND=1 needs valgrind" >&2; exit 1; }
  export SG_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.out"
  PERF=0
fi
bench_start "$work" 1
url="http://127.0.0.1:18083/bench/$SIZE.bin"
[[ $TLS == 1 ]] && url="https://127.0.0.1:18444/bench/$SIZE.bin"
taskset -c 0 wrk -t1 -c"$CONNS" -d2s "$url" >/dev/null

before=$(cpu_ticks "$sg_pid")
[[ $CALLGRIND == 1 ]] && callgrind_control -z "$sg_pid" >/dev/null
if [[ $PERF == 1 ]]; then
  perf record -q -F 1999 -p "$sg_pid" -o "$work/perf.data" -- sleep "$DURATION" 2>/dev/null &
  perf_pid=$!
fi
result=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url")
[[ $PERF == 1 ]] && wait "$perf_pid"
[[ $CALLGRIND == 1 ]] && callgrind_control -d "$sg_pid" >/dev/null
after=$(cpu_ticks "$sg_pid")
requests=$(awk '/requests in/ {print $1}' <<<"$result")
echo "$result" | grep -E "Requests/sec|Latency|requests in|errors" || true
if grep -q "Non-2xx" <<<"$result"; then
  echo "error responses during the run:" >&2
  echo "$result" >&2
  exit 1
fi
if [[ $CALLGRIND == 1 ]]; then
  # Inclusive instructions per request: the total, then sealgate's hooks
  # and wrappers, and pingora's timer work that sealgate's timeouts cause.
  callgrind_annotate --inclusive=yes --threshold=100 "$work/callgrind.out.1" 2>/dev/null |
    awk -v n="$requests" '
      /PROGRAM TOTALS/ { gsub(",", "", $1); printf "instructions per request: %d (%d requests)\n", $1 / n, n }
      /sealgate::|pingora_timeout::/ && /\(/ {
        count = $1; gsub(",", "", count); name = $0
        sub(/^ *[0-9,]+ \( *[0-9.]+%\) +(\?\?\?:)?/, "", name); sub(/ \[.*/, "", name)
        if (count / n >= 100) printf "%8d  %s\n", count / n, name
      }' | head -30
  exit 0
fi
awk -v t=$((after - before)) -v n="$requests" -v hz="$hz" \
  'BEGIN { printf "sealgate CPU: %.3f s per 10k requests (%d requests)\n", t / hz / n * 10000, n }'
if [[ $PERF == 1 ]]; then
  perf report -i "$work/perf.data" --no-children --sort dso,symbol --percent-limit 0.7 \
    --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -60
fi
