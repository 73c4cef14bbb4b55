#!/usr/bin/env bash
# The two quick-start commands, and what CI runs.
#   ./dev.sh demo   build sealgate and run its built-in demo (loopback only)
#   ./dev.sh test   run the whole test suite
# Both first install what a fresh machine lacks: pingora's zlib-ng build
# needs cmake.
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

case "${1:-}" in
  demo)
    ensure_build_tools
    exec cargo run --quiet --bin sealgate -- demo
    ;;
  test)
    ensure_build_tools
    exec cargo test --all-targets
    ;;
  setup)
    ensure_build_tools
    ;;
  *)
    echo "usage: ./dev.sh demo | test | setup" >&2
    exit 2
    ;;
esac
