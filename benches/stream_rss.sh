#!/usr/bin/env bash
# benches/stream_rss.sh: how much sealgate's resident memory grows while a
# large response streams through it, at full speed and to a slow client.
# A proxy that buffers bodies grows by the body size; a streaming one stays
# flat because backpressure reaches the upstream. Target: < 16 MiB growth
# for 256 MiB.
#
#   benches/stream_rss.sh                 # release build, 256 MiB, slow client at 32 MB/s
#   SIZE_MIB=64 SLOW_RATE=16M benches/stream_rss.sh
#
# Everything runs on 127.0.0.1; every process started here is ended on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-256}
SLOW_RATE=${SLOW_RATE:-32M}
LIMIT_MIB=${LIMIT_MIB:-16}

source benches/bench_setup.sh
BIN=$(bench_binary)
bench_workdir stream-rss

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)

# An upstream that generates the body on the fly (no disk, no buffering).
cat >"$work/upstream.py" <<'PY'
import http.server, sys, urllib.parse
CHUNK = b"x" * 65536
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        size = int(q.get("bytes", ["1024"])[0])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size > 0:
            n = min(size, len(CHUNK))
            self.wfile.write(CHUNK[:n])
            size -= n
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
python3 "$work/upstream.py" "$up_port" & pids+=($!)
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$up_port/" && break
  sleep 0.05
done

bench_policy "$work/policies" "$up_port"
cat >"$work/sealgate.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$proxy_port"]
threads = 1
grace_period_s = 1
[admin]
listen = "127.0.0.1:$admin_port"
[audit]
output = "audit.log"
[policy]
dir = "policies"
[datasources.big]
url = "http://127.0.0.1:$up_port"
timeout_ms = 30000
TOML
RUST_LOG=warn "$BIN" run -c "$work/sealgate.toml" 2>"$work/stderr" & sg=$!; pids+=($sg)
for _ in $(seq 200); do
  curl -sf -o /dev/null "http://127.0.0.1:$admin_port/readyz" && break
  sleep 0.05
done
curl -sf -o /dev/null "http://127.0.0.1:$proxy_port/big/warm?bytes=1048576" || { cat "$work/stderr"; exit 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$sg/status"; }

# measure LABEL CURL_ARGS...: prints base, peak and growth of VmRSS in KiB
measure() {
  local label=$1; shift
  local base peak sampler out
  base=$(rss_kib)
  echo "$base" >"$work/peak"
  # Each new peak replaces the file whole (rename), so a read never sees it
  # half-written, even when the sampler is stopped mid-write.
  ( peak=$base
    while sleep 0.02; do
      r=$(rss_kib) || break
      if ((r > peak)); then
        peak=$r
        echo "$peak" >"$work/peak.new" && mv "$work/peak.new" "$work/peak"
      fi
    done ) &
  sampler=$!
  out=$(curl -sS -o /dev/null -w '%{size_download} %{speed_download}' "$@" \
        "http://127.0.0.1:$proxy_port/big/file?bytes=$((SIZE_MIB * 1024 * 1024))")
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  peak=$(cat "$work/peak")
  read -r got speed <<<"$out"
  [[ $got == $((SIZE_MIB * 1024 * 1024)) ]] || { echo "$label: got $got bytes, expected all" >&2; exit 1; }
  local growth=$((peak - base))
  awk -v l="$label" -v sz="$SIZE_MIB" -v sp="$speed" -v b="$base" -v p="$peak" -v g="$growth" \
      -v verdict="$( ((growth < LIMIT_MIB * 1024)) && echo ok || echo OVER)" 'BEGIN {
    printf "%-24s %4d MiB  %8.1f MB/s  RSS base %6d KiB  peak %6d KiB  growth %6d KiB (%.1f MiB)  %s\n",
      l, sz, sp / 1e6, b, p, g, g / 1024, verdict }'
  ((growth < LIMIT_MIB * 1024))
}

echo "sealgate $("$BIN" --version | awk '{print $2}') ($BIN), ${SIZE_MIB} MiB response, limit ${LIMIT_MIB} MiB growth"
status=0
measure "full speed" || status=1
measure "slow client ($SLOW_RATE/s)" --limit-rate "$SLOW_RATE" || status=1
exit $status
