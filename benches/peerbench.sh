#!/usr/bin/env bash
# benches/peerbench.sh: sealgate with a production-like config (egress
# policy, a sealed bearer credential injected on every request, audit to a
# file, metrics on) measured by the shared peerbench harness next to nginx,
# HAProxy and a bare pingora proxy, in one run. Results: peerbench's tables
# on stderr and JSON in $OUT_JSON.
#
#   benches/peerbench.sh                       # 3 rounds, every scenario
#   ROUNDS=1 SCENARIOS="small" benches/peerbench.sh
#
# peerbench's check that the credential was injected reads it back from a
# response body, which sealgate scrubs: it says "NO" ("upstream saw
# 'Bearer ****'"). SCRUB=off turns scrubbing off, and the check says yes.
#
# Everything stays on 127.0.0.1; peerbench ends every process it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PEERBENCH=${PEERBENCH:-$PWD/../shared/tools/peerbench/run.sh}
[[ -x $PEERBENCH || -f $PEERBENCH ]] || { echo "peerbench not found at $PEERBENCH" >&2; exit 1; }
source benches/bench_setup.sh
SG=$(bench_binary)
bench_workdir peerbench
bench_setup "$work" "$SG"

PUT_NAME=sealgate PUT_PORT=18083 PUT_TLS_PORT=18444 PUT_PREFIX=/bench \
  PUT_CMD="$work/start.sh" WITH_TOY=${WITH_TOY:-1} \
  OUT_JSON=${OUT_JSON:-$PWD/peerbench.json} bash "$PEERBENCH"
