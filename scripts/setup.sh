#!/usr/bin/env bash
# Installs the peers (QEMU tools, nbdkit, libnbd tools, fio, nbd-server) with apt-get when missing and
# the project with its test extra into .venv. Sourced by test.sh and demo.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

declare -A peer_package=(
    [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
    [qemu-storage-daemon]=qemu-system-common [qemu-system-x86_64]=qemu-system-x86
    [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=python3-libnbd
    [fio]=fio [nbd-server]=nbd-server [openssl]=openssl
)
missing=()
for tool in "${!peer_package[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${peer_package[$tool]}")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "setup: installing peers: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[test]' >&2
    touch "$stamp"
fi
