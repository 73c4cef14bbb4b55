#!/usr/bin/env bash
# The two quick-start commands, and what CI runs.
#   ./dev.sh demo       build sealgate and run its built-in demo (loopback only)
#   ./dev.sh test       run the whole test suite
#   ./dev.sh release    the build to ship, profile-guided (about 5 min on
#                       2 cores); prints the binary's path on stdout
#   ./dev.sh pgo-train  retrain pgo/sealgate.profdata (see pgo_train)
#   ./dev.sh bench-setup  also what the benchmarks compare against and load with
#                       (pgbouncer, haproxy, nginx, wrk, valgrind)
#   ./dev.sh fuzz       the property tests of every parser of outside input
#                       and of the memory a length field may take
#                       (tests/allocations.rs), long: CASES (default
#                       100000) generated inputs each,
#                       optimised with overflow checks on (profile `fuzz`);
#                       `./dev.sh test` runs the same properties, 256 each
# Each first installs what a fresh machine lacks: pingora's zlib-ng build
# needs cmake.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

apt_install() {
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_build_tools() {
  command -v cmake >/dev/null 2>&1 && return 0
  echo "dev.sh: installing cmake (needed to build pingora's zlib-ng)" >&2
  apt_install cmake
}

# The PostgreSQL tests start a real server (Debian keeps its binaries in
# /usr/lib/postgresql/N/bin, off PATH) and talk to it with psql.
ensure_postgres() {
  if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && command -v psql >/dev/null 2>&1; then
    return 0
  fi
  echo "dev.sh: installing the PostgreSQL server and psql (for the PostgreSQL tests and demo)" >&2
  apt_install postgresql postgresql-client
}

# The MySQL tests start a real MariaDB server (mariadbd, mariadb-install-db)
# and talk to it with the mariadb client; some make an RSA client key with
# the openssl tool.
ensure_mariadb() {
  if command -v mariadbd >/dev/null 2>&1 && command -v mariadb >/dev/null 2>&1 \
    && command -v openssl >/dev/null 2>&1; then
    return 0
  fi
  echo "dev.sh: installing the MariaDB server and client (for the MySQL tests)" >&2
  apt_install mariadb-server mariadb-client openssl
}

# The SigV4 tests sign against moto in server mode (it recomputes every
# signature), set up with boto3, which moto brings.
ensure_moto() {
  command -v moto_server >/dev/null 2>&1 && return 0
  echo "dev.sh: installing moto[server] (the SigV4 tests' verifier)" >&2
  python3 -m pip install -q 'moto[server]==5.0.28'
}

# The OAuth2 clock-step test steps sealgate's wall clock with libfaketime.
ensure_faketime() {
  [[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]] && return 0
  echo "dev.sh: installing faketime (the OAuth2 clock-step test)" >&2
  apt_install faketime
}

# llvm-profdata must come from rustc's own LLVM: rustup's llvm-tools.
profdata_tool() {
  local tool
  tool="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
  if [[ ! -x $tool ]]; then
    echo "dev.sh: installing rustup's llvm-tools (llvm-profdata, for the profile-guided build)" >&2
    rustup component add llvm-tools >&2
  fi
  echo "$tool"
}

# The release build is profile-guided, from the profile committed in
# pgo/sealgate.profdata, so that one commit always gives the same build in
# the same time. Training on every build does not: of two trainings of the
# same code, 99.9% alike, one built in 5 min and the other was still in
# LLVM (SLP vectoriser, then register-allocation liveness, on one function)
# after 10 (docs/BENCHMARKS.md). CI's timeout catches a profile like that.
# cargo writes to stderr, so stdout carries only the binary's path.
#
# The functions that run are laid out together (pgo/symbol-order.txt, made
# by benches/symbol_order.sh): the kernel maps code in 64 KiB pieces, and
# scattered they kept 4 MiB more of the binary resident under load. Only
# the final link takes the order, so the dependencies stay built.
release_build() {
  RUSTFLAGS="-Cprofile-use=$PWD/pgo/sealgate.profdata" \
    cargo rustc --release --locked --bin sealgate --target-dir target/pgo/optimized -- \
    -C link-arg=-Wl,--symbol-ordering-file="$PWD/pgo/symbol-order.txt" \
    -C link-arg=-Wl,--no-warn-symbol-ordering
  echo "$PWD/target/pgo/optimized/release/sealgate"
}

# Retrain after changing the request path: an instrumented build runs
# tests/workload.rs twice, the benchmarks' downloads (long) and every path
# the test covers (short), and the two profiles are merged 20 to 1. LLVM
# then optimises the benchmarked path hardest and still treats HTTP/2, TLS
# data sources, uploads and refusals as warm, not as cold code to be
# optimised for size. A profile of the full mix alone made the build run
# past 20 minutes. Check that `./dev.sh release` still builds in minutes, and
# measure before committing the new profile.
pgo_train() {
  local profdata pgo instrumented
  profdata=$(profdata_tool)
  pgo="$PWD/target/pgo"
  instrumented="$pgo/instrumented/release/sealgate"
  RUSTFLAGS="-Cprofile-generate=$pgo/build-scripts" \
    cargo build --release --locked --bin sealgate --target-dir "$pgo/instrumented"
  for run in downloads:300 full:100; do
    local mix=${run%:*} rounds=${run#*:}
    rm -rf "${pgo:?}/$mix"
    LLVM_PROFILE_FILE="$pgo/$mix/%p-%m.profraw" SEALGATE_TEST_BIN="$instrumented" \
      SEALGATE_WORKLOAD_MIX=$mix SEALGATE_WORKLOAD_ROUNDS=$rounds \
      cargo test --locked --test workload -- --quiet
    "$profdata" merge -o "$pgo/$mix.profdata" "$pgo/$mix"
  done
  "$profdata" merge -o pgo/sealgate.profdata \
    --weighted-input=20,"$pgo/downloads.profdata" --weighted-input=1,"$pgo/full.profdata"
  echo "dev.sh: new profile in pgo/sealgate.profdata; now ./dev.sh release" >&2
}

# The benchmarks' peers and load: PgBouncer and HAProxy (benches/pgbench.sh),
# nginx and wrk (the HTTP benchmarks), valgrind (benches/profile.sh's
# CALLGRIND=1, benches/symbol_order.sh).
ensure_bench_peers() {
  local missing=() tool
  for tool in pgbouncer haproxy nginx wrk valgrind; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [[ ${#missing[@]} == 0 ]] && return 0
  echo "dev.sh: installing ${missing[*]} (for the benchmarks)" >&2
  apt_install "${missing[@]}"
}

case "${1:-}" in
  demo)
    ensure_build_tools
    ensure_postgres
    exec cargo run --quiet --bin sealgate -- demo
    ;;
  test)
    ensure_build_tools
    ensure_postgres
    ensure_mariadb
    ensure_moto
    ensure_faketime
    exec cargo test --all-targets
    ;;
  release)
    ensure_build_tools
    release_build
    ;;
  pgo-train)
    ensure_build_tools
    pgo_train
    ;;
  setup)
    ensure_build_tools
    ensure_postgres
    ensure_mariadb
    ensure_moto
    ensure_faketime
    ;;
  fuzz)
    ensure_build_tools
    export PROPTEST_CASES=${CASES:-100000}
    cargo test --profile fuzz --lib properties
    exec cargo test --profile fuzz --test allocations
    ;;
  bench-setup)
    ensure_build_tools
    ensure_postgres
    ensure_mariadb
    ensure_bench_peers
    ;;
  *)
    echo "usage: ./dev.sh demo | test | release | pgo-train | setup | bench-setup | fuzz" >&2
    exit 2
    ;;
esac
