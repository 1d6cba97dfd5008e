#!/usr/bin/env bash
# Browser tests drive Debian's Chromium headless; nothing is downloaded from a browser vendor.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null; then exit 0; fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium: not installed. Install it (sudo apt-get install -y chromium) for the browser tests." >&2
  exit 1
fi
echo "chromium: installing Debian's chromium for the browser tests..."
DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y -qq chromium >/dev/null
