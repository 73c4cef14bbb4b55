#!/usr/bin/env bash
# The two quick-start commands, and what CI runs.
#   ./dev.sh demo   build sealgate and run its built-in demo (loopback only)
#   ./dev.sh test   run the whole test suite
# Both first install what a fresh machine lacks: pingora's zlib-ng build
# needs cmake.
#   ./dev.sh release  the build to ship, profile-guided (about 12 min on
#                     2 cores): target/pgo/optimized/release/sealgate
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

ensure_build_tools() {
  command -v cmake >/dev/null 2>&1 && return 0
  echo "dev.sh: installing cmake (needed to build pingora's zlib-ng)" >&2
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake >/dev/null
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

# Profile-guided release build. An instrumented build runs tests/workload.rs
# twice: the benchmarks' downloads, long, and every path the workload test
# covers, short. The downloads profile is weighted 20 to 1, so LLVM
# optimises the benchmarked request path hardest, lays it out together, and
# still treats HTTP/2, TLS data sources, uploads and refusals as warm rather
# than cold code to be optimised for size. A profile weighted evenly made the
# fat-LTO step run past 20 minutes (docs/BENCHMARKS.md).
release_pgo() {
  local profdata pgo instrumented
  # train MIX ROUNDS: the workload test against the instrumented build,
  # its profile merged into $pgo/MIX.profdata.
  train() {
    rm -rf "${pgo:?}/$1"
    LLVM_PROFILE_FILE="$pgo/$1/%p-%m.profraw" SEALGATE_TEST_BIN="$instrumented" \
      SEALGATE_WORKLOAD_MIX=$1 SEALGATE_WORKLOAD_ROUNDS=$2 \
      cargo test --locked --test workload -- --quiet
    "$profdata" merge -o "$pgo/$1.profdata" "$pgo/$1"
  }
  profdata=$(profdata_tool)
  pgo="$PWD/target/pgo"
  instrumented="$pgo/instrumented/release/sealgate"
  RUSTFLAGS="-Cprofile-generate=$pgo/build-scripts" \
    cargo build --release --locked --bin sealgate --target-dir "$pgo/instrumented"
  # rustc tracks the profile: a new one rebuilds every crate, so train
  # again only when the instrumented binary changed.
  if [[ ! $pgo/sealgate.profdata -nt $instrumented ]]; then
    train downloads 300
    train full 100
    "$profdata" merge -o "$pgo/sealgate.profdata" \
      --weighted-input=20,"$pgo/downloads.profdata" --weighted-input=1,"$pgo/full.profdata"
  fi
  RUSTFLAGS="-Cprofile-use=$pgo/sealgate.profdata" \
    cargo build --release --locked --bin sealgate --target-dir "$pgo/optimized"
  echo "dev.sh: profile-guided build: $pgo/optimized/release/sealgate" >&2
}

case "${1:-}" in
  demo)
    ensure_build_tools
    exec cargo run --quiet --bin sealgate -- demo
    ;;
  test)
    ensure_build_tools
    exec cargo test --all-targets
    ;;
  release)
    ensure_build_tools
    release_pgo
    ;;
  setup)
    ensure_build_tools
    ;;
  *)
    echo "usage: ./dev.sh demo | test | release | setup" >&2
    exit 2
    ;;
esac
