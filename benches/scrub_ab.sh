#!/usr/bin/env bash
# benches/scrub_ab.sh: what scrubbing response bodies costs (issue 21), both
# ways in one run: benches/ab.sh with two sealgates of the same build, one
# with `scrub_responses` on (the default for a data source with a
# credential) and one with it off. Per round: CPU per 64 KiB GET, its p99,
# and the MB/s of one $BIG_MIB MiB GET; then the medians, and on against
# off round by round.
#
#   benches/scrub_ab.sh
#   ROUNDS=3 DURATION=4 benches/scrub_ab.sh
#   SEALGATE_BIN=target/release/sealgate benches/scrub_ab.sh
#
# The secret is peerbench's (`test`): four letters, the shortest forms and
# so the most a search finds by chance.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
A_NAME=on B_NAME=off A_SCRUB=on B_SCRUB=off SIZES=64k STREAM=1 \
  A_BIN=${SEALGATE_BIN:-} B_BIN=${SEALGATE_BIN:-} exec benches/ab.sh
