#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian machine (idempotently), checks style and types
# (ruff, mypy), and runs every test.
#   scripts/test.sh            — lint + all of tests/ and integration/
#   scripts/test.sh -k qcow2   — extra arguments go to pytest (lint is skipped when any are given)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "$#" -eq 0 ]; then
    echo "lint: ruff check, ruff format --check, mypy" >&2
    .venv/bin/ruff check --quiet .
    .venv/bin/ruff format --check --quiet .
    .venv/bin/mypy
fi
exec .venv/bin/python -m pytest "$@"
