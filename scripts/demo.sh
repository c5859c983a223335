#!/usr/bin/env bash
# Watch a live, point-in-time backup happen, in one command (about 15 s once set up).
#
# It starts `nbd-backup serve` with a scratch disk exported over NBD and its QMP monitor, starts a
# throttled backup with `nbd-backup backup`, and while the backup runs a "guest" (qemu-io, through
# NBD) overwrites parts of the disk. Then it checks that the backup equals the disk as it was when
# the backup started — not as it is now — and says what happened.
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"   # peers + .venv; leaves us in the repository root

PY="$PWD/.venv/bin/python"
nbd_backup() { "$PY" -m server.cli "$@"; }
SIZE_MIB=64
SPEED=16M           # bytes/s: slow enough that the guest's writes land while the backup runs
work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-backup-demo.XXXXXX")
daemon_pid=""
writer_pid=""

cleanup() {
    status=$?
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ]; then
        echo "demo: FAILED (exit $status); daemon log:" >&2
        sed 's/^/    /' "$work/serve.log" >&2 2>/dev/null || true
    fi
    if [ "$status" -eq 0 ] || [ -z "${DEMO_KEEP:-}" ]; then rm -rf "$work"; else echo "demo: files kept in $work" >&2; fi
}
trap cleanup EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "A ${SIZE_MIB} MiB scratch disk full of the guest's data (pattern 0xa5)"
qemu-img create -q -f raw "$work/disk.raw" "${SIZE_MIB}M"
qemu-io -f raw -c "write -q -P 0xa5 0 ${SIZE_MIB}M" "$work/disk.raw"
cp --sparse=always "$work/disk.raw" "$work/point-in-time.raw"   # what the backup must contain
echo "    $work/disk.raw"

step "Starting the daemon: NBD export 'disk' + QMP monitor"
"$PY" -m server.cli serve --export "disk=$work/disk.raw" --nbd-socket "$work/nbd.sock" \
    --qmp "unix:$work/qmp.sock" --pid-file "$work/serve.pid" 2>"$work/serve.log" &
daemon_pid=$!   # python itself (not a subshell), so SIGTERM reaches the daemon
for _ in $(seq 200); do [ -s "$work/serve.pid" ] && break; sleep 0.05; done
[ -s "$work/serve.pid" ] || { echo "the daemon did not start" >&2; exit 1; }
sed 's/^/    /' "$work/serve.log"

step "Backing the disk up (throttled to $SPEED/s) while the guest keeps writing to it"
guest_uri="nbd+unix:///disk?socket=$work/nbd.sock"
(
    # Wait until the backup job exists: from then on its point in time is fixed.
    "$PY" - "unix:$work/qmp.sock" <<'PYEOF'
import asyncio, sys
from server.qmp.client import QmpClient

async def wait_for_job() -> None:
    conn = await QmpClient.connect(sys.argv[1])
    try:
        while not await conn.execute("query-block-jobs"):
            await asyncio.sleep(0.02)
    finally:
        await conn.close()

asyncio.run(asyncio.wait_for(wait_for_job(), 30))
PYEOF
    for offset in 8 24 40 56; do
        qemu-io -f raw -c "write -q -P 0x5a ${offset}M 4M" "$guest_uri"
        echo "guest wrote 4 MiB of 0x5a at ${offset} MiB"
        sleep 0.3
    done
) >"$work/guest.log" 2>&1 &
writer_pid=$!
started=$EPOCHREALTIME
nbd_backup backup --qmp "unix:$work/qmp.sock" disk "$work/backup.qcow2" --format qcow2 --speed "$SPEED" --progress
finished=$EPOCHREALTIME
wait "$writer_pid"
writer_pid=""
sed 's/^/    /' "$work/guest.log"

step "Checking the result"
qemu-img compare -q -f raw -F qcow2 "$work/point-in-time.raw" "$work/backup.qcow2"
echo "    backup.qcow2 == the disk at the moment the backup started  (qemu-img compare: identical)"
if qemu-img compare -q -f raw -F qcow2 "$work/disk.raw" "$work/backup.qcow2" 2>/dev/null; then
    echo "    (the guest's writes did not reach the disk?)" >&2
    exit 1
fi
echo "    disk.raw now differs from the backup: the guest's 16 MiB of 0x5a went to the disk only;"
echo "    copy-before-write copied the old data of every block the guest overwrote before the"
echo "    backup job had reached it."

kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=""
elapsed=$("$PY" -c "print(f'{$finished - $started:.1f}')")
printf '\n\033[1mLive backup done in %s s; the daemon stopped cleanly on SIGTERM.\033[0m\n' "$elapsed"
cat <<EOF
Try it yourself:
  .venv/bin/nbd-backup serve --export disk=disk.raw --qmp unix:qmp.sock &
  .venv/bin/nbd-backup backup --qmp unix:qmp.sock disk backup.qcow2 --format qcow2 --speed 16M
  .venv/bin/qmp-shell qmp.sock          # QEMU's own QMP shell: query-block-jobs, block-job-pause …
EOF
