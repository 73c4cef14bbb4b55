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
# Everything stays on 127.0.0.1; peerbench ends every process it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PEERBENCH=${PEERBENCH:-$PWD/../shared/tools/peerbench/run.sh}
[[ -x $PEERBENCH || -f $PEERBENCH ]] || { echo "peerbench not found at $PEERBENCH" >&2; exit 1; }
./dev.sh setup
cargo build --release --quiet
SG=$PWD/target/release/sealgate

work=$(mktemp -d "${TMPDIR:-/tmp}/sealgate-peerbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/keys" "$work/policies"
"$SG" keygen --out "$work/keys/k1.key" 2>/dev/null
salt=$("$SG" salt)
printf '[keys]\ndir = "%s/keys"\nprimary = "k1"\nsalt = "%s"\n' "$work" "$salt" >"$work/keys.toml"
# peerbench checks that every proxy injects exactly `Authorization: Bearer test`.
sealed=$(printf 'test' | "$SG" seal -c "$work/keys.toml" --datasource bench --field token)
cat >"$work/policies/bench.toml" <<TOML
[egress]
allow = ["127.0.0.1:18080"]
allow_private = ["127.0.0.1/32:18080"]
TOML

# peerbench makes its certificate and upstream at run time, so the config is
# written when sealgate starts.
cat >"$work/start.sh" <<SH
#!/usr/bin/env bash
cat >"$work/sealgate.toml" <<TOML
[proxy]
listen = ["127.0.0.1:18083"]
threads = 1
[proxy.tls]
listen = ["127.0.0.1:18444"]
cert = "\$PB_CERT"
key = "\$PB_KEY"
[admin]
listen = "127.0.0.1:18990"
[audit]
output = "$work/audit.log"
[policy]
dir = "$work/policies"
\$(cat "$work/keys.toml")
[datasources.bench]
url = "http://\$PB_UPSTREAM"
timeout_ms = 30000
credential = { kind = "bearer", token = "$sealed" }
TOML
RUST_LOG=warn exec "$SG" run -c "$work/sealgate.toml"
SH
chmod +x "$work/start.sh"

PUT_NAME=sealgate PUT_PORT=18083 PUT_TLS_PORT=18444 PUT_PREFIX=/bench \
  PUT_CMD="$work/start.sh" WITH_TOY=${WITH_TOY:-1} \
  OUT_JSON=${OUT_JSON:-$PWD/peerbench.json} bash "$PEERBENCH"
