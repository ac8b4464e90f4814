#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Mosquitto, the reference broker and clients some end-to-end tests use),
# then every unit, integration and end-to-end test, and a smoke run of the
# benchmark harness.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a system mosquitto on 1883; the tests use their own ports
# and never need it.
export PATH="$PATH:/usr/sbin"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --all-targets "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite: the last binaries cargo runs are
# benchmarks in test mode, which print no "test result" of their own.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
