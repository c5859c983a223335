#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian machine (idempotently) and runs every test.
#   scripts/test.sh            — all of tests/ and integration/
#   scripts/test.sh -k qcow2   — extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
