# Sourced by the benchmark scripts. bench_setup: sealgate with a production-like config
# (egress policy, a sealed bearer credential injected on every request,
# audit to a file, metrics on). bench_setup WORK writes keys, policy and
# WORK/start.sh, which runs sealgate in the foreground; start.sh writes the
# config when it starts, from PB_UPSTREAM, PB_CERT and PB_KEY (peerbench's
# names), since those are only known at run time. SG_WRAPPER, if set when
# start.sh runs, is put before the sealgate command (e.g. valgrind).
#   proxy 127.0.0.1:18083, TLS 127.0.0.1:18444, admin 127.0.0.1:18990,
#   data source "bench" (paths /bench/...), upstream 127.0.0.1:18080.
# CREDENTIAL=oauth2 makes the credential an OAuth2 one instead, its token
# ("test", as peerbench checks) fetched from a token endpoint on
# 127.0.0.1:18070 that start.sh starts.
# SCRUB=off turns response body scrubbing off (it is on by default for a
# data source with a credential), to measure what scrubbing costs.
# SG_PORT, SG_TLS_PORT and SG_ADMIN_PORT move the listeners, for a second
# sealgate beside the first.

# cpu_ticks PID: the user and system CPU the process has used so far, in
# clock ticks ($hz a second); 0 without a PID (a peer with no process of
# its own, such as "direct").
cpu_ticks() { [[ -n $1 ]] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
hz=$(getconf CLK_TCK)

# bench_binary: the build users ship (`./dev.sh release`, profile-guided),
# or $SEALGATE_BIN, e.g. to compare a plain `cargo build --release`.
bench_binary() {
  if [[ -n ${SEALGATE_BIN:-} ]]; then
    echo "$SEALGATE_BIN"
  else
    ./dev.sh release
  fi
}

# bench_workdir NAME makes $work, removed at exit, and $pids, whose
# processes are ended at exit.
bench_workdir() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/sealgate-$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ -f $work/token_endpoint.pid ]] && kill "$(cat "$work/token_endpoint.pid")" 2>/dev/null
  true
  wait 2>/dev/null || true
  rm -rf "$work"
}

# bench_policy DIR PORT: a policy that lets sealgate reach a loopback
# upstream on PORT (nothing is reachable without an allow entry).
bench_policy() {
  mkdir -p "$1"
  cat >"$1/bench.toml" <<TOML
[egress]
allow = ["127.0.0.1:$2"]
allow_private = ["127.0.0.1/32:$2"]
TOML
}

bench_setup() {
  local work=$1 sg=$2
  local port=${SG_PORT:-18083} tls_port=${SG_TLS_PORT:-18444} admin_port=${SG_ADMIN_PORT:-18990}
  mkdir -p "$work/keys"
  "$sg" keygen --out "$work/keys/k1.key" 2>/dev/null
  local salt sealed
  salt=$("$sg" salt)
  printf '[keys]\ndir = "%s/keys"\nprimary = "k1"\nsalt = "%s"\n' "$work" "$salt" >"$work/keys.toml"
  # peerbench checks that every proxy injects exactly `Authorization: Bearer test`.
  sealed=$(printf 'test' | "$sg" seal -c "$work/keys.toml" --datasource bench --field token)
  local credential="{ kind = \"bearer\", token = \"$sealed\" }" token_endpoint=""
  local scrub=true
  [[ ${SCRUB:-on} == off ]] && scrub=false
  if [[ ${CREDENTIAL:-bearer} == oauth2 ]]; then
    sealed=$(printf 'bench-client-secret' | "$sg" seal -c "$work/keys.toml" --datasource bench --field client_secret)
    credential="{ kind = \"oauth2\", token_url = \"http://127.0.0.1:18070/token\", client_id = \"bench\", client_secret = \"$sealed\" }"
    cat >"$work/token_endpoint.py" <<'PY'
import http.server, json
class Token(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"access_token": "test", "token_type": "Bearer", "expires_in": 3600}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", 18070), Token).serve_forever()
PY
    token_endpoint="python3 $work/token_endpoint.py & echo \$! >$work/token_endpoint.pid"
  fi
  bench_policy "$work/policies" 18080
  if [[ ${CREDENTIAL:-bearer} == oauth2 ]]; then
    bench_policy "$work/token-policy" 18070
    cp "$work/token-policy/bench.toml" "$work/policies/token.toml"
  fi
  cat >"$work/start.sh" <<SH
#!/usr/bin/env bash
cat >"$work/sealgate.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$port"]
threads = 1
[proxy.tls]
listen = ["127.0.0.1:$tls_port"]
cert = "\$PB_CERT"
key = "\$PB_KEY"
[admin]
listen = "127.0.0.1:$admin_port"
[audit]
output = "$work/audit.log"
[policy]
dir = "$work/policies"
\$(cat "$work/keys.toml")
[datasources.bench]
url = "http://\$PB_UPSTREAM"
timeout_ms = 30000
scrub_responses = $scrub
credential = $credential
TOML
$token_endpoint
RUST_LOG=warn exec \${SG_WRAPPER:-} "$sg" run -c "$work/sealgate.toml"
SH
  chmod +x "$work/start.sh"
}

# bench_cert WORK: a self-signed certificate for 127.0.0.1, WORK/cert.pem
# and WORK/key.pem, where peerbench would give one.
bench_cert() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1" \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# bench_upstream WORK CPU: nginx on 127.0.0.1:18080, pinned to CPU, serving
# random bytes from WORK/www: 1k.bin, 64k.bin, and big.bin of $BIG_MIB MiB
# if set. Its pid joins $pids.
bench_upstream() {
  local work=$1 cpu=$2
  chmod 755 "$work" # nginx's workers read the content as another user
  mkdir -p "$work/www" "$work/tmp"
  head -c 1024 /dev/urandom >"$work/www/1k.bin"
  head -c 65536 /dev/urandom >"$work/www/64k.bin"
  [[ -n ${BIG_MIB:-} ]] && head -c "${BIG_MIB}M" /dev/urandom >"$work/www/big.bin"
  cat >"$work/upstream.conf" <<NGINX
worker_processes 1; daemon off; pid $work/upstream.pid; error_log $work/upstream.err warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $work/tmp/b; proxy_temp_path $work/tmp/p; fastcgi_temp_path $work/tmp/f;
  uwsgi_temp_path $work/tmp/u; scgi_temp_path $work/tmp/s;
  access_log off; sendfile on; tcp_nodelay on;
  keepalive_timeout 300s; keepalive_requests 100000000;
  server { listen 127.0.0.1:18080; root $work/www; }
}
NGINX
  taskset -c "$cpu" nginx -c "$work/upstream.conf" -p "$work" 2>/dev/null &
  pids+=($!)
}

# bench_start WORK CPU [PORT]: runs WORK/start.sh with peerbench's
# variables (WORK/cert.pem, the upstream of bench_upstream), pinned to CPU
# ("" for any), its pid in $sg_pid and $pids, and waits until it serves the
# data source on PORT (18083): up to 30 s, since under valgrind sealgate
# takes seconds to start.
bench_start() {
  local work=$1 cpu=$2 port=${3:-18083} pin=()
  [[ -n $cpu ]] && pin=(taskset -c "$cpu")
  PB_UPSTREAM=127.0.0.1:18080 PB_CERT=$work/cert.pem PB_KEY=$work/key.pem \
    "${pin[@]}" "$work/start.sh" 2>"$work/sealgate.err" &
  sg_pid=$!
  pids+=("$sg_pid")
  for _ in $(seq 300); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/bench/1k.bin" && return 0
    sleep 0.1
  done
  echo "sealgate did not start:" >&2
  cat "$work/sealgate.err" >&2
  exit 1
}
