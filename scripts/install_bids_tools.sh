#!/usr/bin/env bash
# Tools the BIDS tests use, outside the repository (idempotent):
#   - the official BIDS validator (npm bids-validator@1.15.0; Node >= 18 must be installed)
#     into ${GLYMPH_TOOLS:-$HOME/.cache/glymphmpi}/node  (tests/test_bids.py looks there, on PATH, or at $BIDS_VALIDATOR)
#   - Debian's chromium (headless; the per-subject report test opens the pages in it), with --chromium
# Usage: scripts/install_bids_tools.sh [--chromium]
set -euo pipefail
tools="${GLYMPH_TOOLS:-$HOME/.cache/glymphmpi}"
say() { echo "[bids-tools] $*"; }
if [ -x "$tools/node/node_modules/.bin/bids-validator" ]; then
  say "bids-validator present ($tools/node)"
elif command -v npm >/dev/null 2>&1; then
  mkdir -p "$tools/node"
  say "npm install bids-validator@1.15.0 in $tools/node (a few minutes)"
  (cd "$tools/node" && npm install --no-audit --no-fund --loglevel=error bids-validator@1.15.0 >/dev/null)
else
  say "no npm: the validator test will be skipped (apt-get install nodejs npm)"
fi
if [ "${1:-}" = "--chromium" ]; then
  if command -v chromium >/dev/null 2>&1; then say "chromium present"; else
    sudo=""; [ "$(id -u)" != 0 ] && sudo=sudo
    say "apt-get install chromium"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null
  fi
fi
