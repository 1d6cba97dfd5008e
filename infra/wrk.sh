#!/usr/bin/env bash
# The HTTP load generator of the benchmarks (bench/join.py): Debian's wrk, nothing downloaded
# from elsewhere. Safe to run again: does nothing when wrk is already on PATH.
set -euo pipefail
if command -v wrk >/dev/null; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "wrk: not installed. Install it (sudo apt-get install -y wrk) for the HTTP benchmarks." >&2
  exit 1
fi
echo "wrk: installing Debian's wrk for the HTTP benchmarks..."
DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y -qq wrk >/dev/null
