#!/usr/bin/env bash
# benches/symbol_order.sh: regenerate pgo/symbol-order.txt, the order in
# which the linker lays out sealgate's functions (`./dev.sh release`
# passes it to lld as --symbol-ordering-file).
#
# Why: the kernel maps a binary's code in 64 KiB pieces around each page
# first run (fault-around), and lld otherwise scatters the functions a
# sidecar runs over its whole 9 MB of code. Every function that runs, from
# start to serving, laid out together and hottest first, took resident
# memory under the peer benchmark's 1 KiB load from 16.5-16.7 MiB to
# 12.3-12.5 (docs/BENCHMARKS.md, issue 22).
#
# How: the build to ship runs under callgrind from start through /readyz,
# /metrics and 8 s each of 1 KiB, 64 KiB and TLS 1 KiB GETs (wrk); every
# function of the binary that ran is listed, most instructions first.
# Names are the binary's own symbols: a function changed since the last
# run is missing until the next one and keeps lld's place for it, which
# costs memory, not correctness.
#
#   benches/symbol_order.sh            # then ./dev.sh release
#
# Needs valgrind, wrk, nginx and openssl (./dev.sh bench-setup).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in valgrind callgrind_control callgrind_annotate wrk nginx openssl curl; do
  command -v "$tool" >/dev/null || { echo "symbol_order.sh needs $tool" >&2; exit 1; }
done
source benches/bench_setup.sh
SG=$(bench_binary)
bench_workdir symbol-order
bench_setup "$work" "$SG"
bench_cert "$work"
bench_upstream "$work" 0
export SG_WRAPPER="valgrind --tool=callgrind --demangle=no --callgrind-out-file=$work/callgrind.out"
bench_start "$work" ""
curl -fs -o /dev/null http://127.0.0.1:18990/readyz
curl -fs -o /dev/null http://127.0.0.1:18990/metrics
for url in http://127.0.0.1:18083/bench/1k.bin http://127.0.0.1:18083/bench/64k.bin \
  https://127.0.0.1:18444/bench/1k.bin; do
  taskset -c 0 wrk -t1 -c50 -d8s "$url" | grep "requests in"
done
# The dump (callgrind.out.1) holds everything up to here; the file
# callgrind writes at exit would hold only the shutdown.
callgrind_control -d "$sg_pid" >/dev/null

binary=$(basename "$SG")
callgrind_annotate --threshold=100 "$work/callgrind.out.1" | python3 -c '
import collections, re, sys
binary = sys.argv[1]
cost = collections.Counter()
for line in sys.stdin:
    found = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\S*?:(\S+)\s+\[(.*)\]\s*$", line)
    if found and found.group(3).endswith("/" + binary) and not found.group(2).startswith("0x"):
        cost[found.group(2)] += int(found.group(1).replace(",", ""))
names = [name for name, _ in cost.most_common()]
open("pgo/symbol-order.txt", "w").write("\n".join(names) + "\n")
print(f"pgo/symbol-order.txt: {len(names)} functions", file=sys.stderr)
' "$binary"
