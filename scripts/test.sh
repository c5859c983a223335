#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian machine (idempotently), checks style and types
# (ruff, mypy), and runs every test.
#   scripts/test.sh            — lint + the container flow (scripts/container-test.sh) + all of tests/ and integration/
#   scripts/test.sh -k qcow2   — extra arguments go to pytest (lint and container are skipped when any are given)
# The container flow runs when podman or docker answers and can get the base image; otherwise it says
# why it was skipped (exit 77) and the tests go on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "$#" -eq 0 ]; then
    echo "lint: ruff check, ruff format --check, mypy" >&2
    .venv/bin/ruff check --quiet .
    .venv/bin/ruff format --check --quiet .
    .venv/bin/mypy
    echo "container: scripts/container-test.sh" >&2
    status=0
    scripts/container-test.sh || status=$?
    [ "$status" -eq 0 ] || [ "$status" -eq 77 ] || exit "$status"
fi
exec .venv/bin/python -m pytest "$@"
