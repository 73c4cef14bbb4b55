#!/usr/bin/env bash
# benches/soak.sh: the soak (issue 23). One sealgate, the build to ship,
# under a mixed load for DURATION seconds (default 1800) while faults are
# injected on a schedule; see tests/soak.rs for the load, the faults and
# what must hold. Prints the test's report: requests and sessions counted
# by the clients and by the audit trail, client failures and the faults
# that explain them, resident memory and open descriptors every 10 s.
#
#   benches/soak.sh
#   DURATION=180 benches/soak.sh          # what CI runs
#   THREADS=2 benches/soak.sh             # sealgate's threads (default 1)
#   SEALGATE_BIN=target/release/sealgate benches/soak.sh
#
# It starts a PostgreSQL and a MariaDB server of its own, as their system
# users when run as root; everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DURATION=${DURATION:-1800}

./dev.sh setup
source benches/bench_setup.sh
SG=$(bench_binary)
SEALGATE_TEST_BIN=$SG SEALGATE_SOAK_SECS=$DURATION SEALGATE_SOAK_THREADS=${THREADS:-1} \
  cargo test --test soak -- --ignored --nocapture
