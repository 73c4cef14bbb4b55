#!/usr/bin/env bash
# benches/scrub_ab.sh: what scrubbing response bodies costs (issue 21), both
# ways in one run. Two sealgates of the same build and config, one with
# `scrub_responses` on (the default for a data source with a credential),
# one with it off, both pinned to CPU 1; nginx and the clients on CPU 0.
# Rounds alternate between the two, so the drift of a shared machine falls
# on both alike: per round, wrk's 64 KiB GETs ($CONNS connections,
# $DURATION s) give sealgate's CPU seconds per 10k requests, and one
# $BIG_MIB MiB GET with curl gives MB/s. Prints every round, the medians,
# and on against off.
#
#   benches/scrub_ab.sh
#   ROUNDS=3 DURATION=4 benches/scrub_ab.sh
#   SEALGATE_BIN=target/release/sealgate benches/scrub_ab.sh
#
# The secret is peerbench's (`test`): four letters, the shortest forms and
# so the most a search finds by chance. Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-7} DURATION=${DURATION:-5} CONNS=${CONNS:-50}
export BIG_MIB=${BIG_MIB:-256}
for tool in wrk nginx openssl taskset curl; do
  command -v "$tool" >/dev/null || { echo "scrub_ab.sh needs $tool" >&2; exit 1; }
done
source benches/bench_setup.sh
SG=$(bench_binary)
bench_workdir scrub-ab
bench_cert "$work"
bench_upstream "$work" 0

declare -A pid_of port
for scrub in on off; do
  if [[ $scrub == on ]]; then port[$scrub]=18083; else port[$scrub]=18086; fi
  mkdir -p "$work/$scrub"
  cp "$work/cert.pem" "$work/key.pem" "$work/$scrub/"
  SCRUB=$scrub SG_PORT=${port[$scrub]} SG_TLS_PORT=$((port[$scrub] + 361)) \
    SG_ADMIN_PORT=$((port[$scrub] + 907)) bench_setup "$work/$scrub" "$SG"
  bench_start "$work/$scrub" 1 "${port[$scrub]}"
  pid_of[$scrub]=$sg_pid
  taskset -c 0 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:${port[$scrub]}/bench/64k.bin" >/dev/null
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results=()
for round in $(seq "$ROUNDS"); do
  for scrub in on off; do
    base="http://127.0.0.1:${port[$scrub]}/bench"
    before=$(cpu_ticks "${pid_of[$scrub]}")
    out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" "$base/64k.bin")
    after=$(cpu_ticks "${pid_of[$scrub]}")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
      echo "errors during the $scrub run:" >&2
      echo "$out" >&2
      exit 1
    fi
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    mbps=$(taskset -c 0 curl -fs -o /dev/null -w '%{speed_download}' "$base/big.bin" |
      awk '{printf "%.0f", $1 / 1e6}')
    cpu=$(awk -v t=$((after - before)) -v n="$requests" -v hz="$hz" \
      'BEGIN { printf "%.3f", t / hz / n * 10000 }')
    echo "round $round, scrubbing $scrub: 64 KiB $cpu CPU s/10k requests ($requests requests), $BIG_MIB MiB at $mbps MB/s"
    results+=("$scrub $cpu $mbps")
  done
done

python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [arg.split() for arg in sys.argv[1:]]
def median(scrub, column):
    return statistics.median(float(r[column]) for r in rows if r[0] == scrub)
on, off = median("on", 1), median("off", 1)
print(f"median 64 KiB CPU s/10k requests: on {on:.3f}, off {off:.3f}, on/off {on / off:.3f}")
on, off = median("on", 2), median("off", 2)
print(f"median stream MB/s: on {on:.0f}, off {off:.0f}, on/off {on / off:.3f}")
pairs = [float(a[1]) / float(b[1]) for a, b in zip(rows[0::2], rows[1::2])]
print("per-round 64 KiB CPU on/off: " + ", ".join(f"{p:.3f}" for p in pairs)
      + f" (median {statistics.median(pairs):.3f})")
PY
