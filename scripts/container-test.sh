#!/usr/bin/env bash
# Builds the container image and runs the README's "Container" flow against it, step by step:
# health check, an image made in the container (owned by uid 10809, no chown), an export reached from
# the host with qemu-img/qemu-io, the QMP socket used from the host and from another container, a
# backup over QMP, `qemu-img compare` of export and backup, and `stop` with a backup running: exit 0
# in under 5 s. The run is locked down as the README recommends (--read-only --cap-drop=ALL
# --security-opt no-new-privileges --tmpfs /tmp).
#
#   scripts/container-test.sh           # podman if it answers, else docker (CONTAINER_RUNTIME=… to choose)
#
# Exit status: 0 passed, 77 skipped (no runtime that answers, no base image to build from, or no
# qemu-img/qemu-io/python3 on the host; the reason is printed), anything else failed.
# The host directories are temporary stand-ins for /srv/backups and /run/nbd-backup (made with the
# same `install` command); the image is kept, so a second run rebuilds from the cache in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIP=77
IMAGE=${IMAGE:-localhost/nbd-backup:container-test}
NAME=nbd-backup-test-$$
T0=$(date +%s)
say() { printf '[container-test +%3ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
skip() {
    say "SKIPPED: $*"
    exit "$SKIP"
}
fail() {
    say "FAILED: $*"
    exit 1
}

# --- can this machine build? ----------------------------------------------------------------------
RT=
for candidate in ${CONTAINER_RUNTIME:-podman docker}; do
    if command -v "$candidate" >/dev/null && "$candidate" info >/dev/null 2>&1; then
        RT=$candidate
        break
    fi
done
[ -n "$RT" ] || skip "no container runtime answers ('${CONTAINER_RUNTIME:-podman/docker} info' failed or not installed)"
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || skip "$tool is not installed on the host (the flow uses it from the host)"
done
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
as_root true 2>/dev/null || skip "the host steps need root (install -o 10809, reading /srv/backups): run as root or with sudo -n"

BASE=$(sed -n 's/^ARG BASE=//p' Dockerfile)
if ! "$RT" image inspect "$BASE" >/dev/null 2>&1; then
    say "pulling $BASE"
    "$RT" pull -q "$BASE" >/dev/null 2>&1 || skip "base image $BASE is not present and cannot be pulled (offline?)"
fi
# Pin the base by tag and digest (the Dockerfile's default is the exact tag: a digest made here would
# not exist in a registry). podman/docker report the digest of the image they have.
DIGEST=$("$RT" image inspect --format '{{.Digest}}' "$BASE" 2>/dev/null || true)
PINNED=$BASE
case $DIGEST in sha256:*) PINNED=$BASE@$DIGEST ;; esac

# --- build ---------------------------------------------------------------------------------------
FORMAT=()
[ "$RT" = podman ] && FORMAT=(--format docker) # OCI images have no HEALTHCHECK: podman would drop it
say "$RT build ${FORMAT[*]} --build-arg BASE=$PINNED -t $IMAGE ."
"$RT" build -q "${FORMAT[@]}" --build-arg "BASE=$PINNED" -t "$IMAGE" . >/dev/null
user=$("$RT" image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = 10809:10809 ] || fail "image user is '$user', expected 10809:10809"
health=$("$RT" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
case $health in *query-version*) ;; *) fail "image has no HEALTHCHECK ($health)" ;; esac
say "image: user $user, healthcheck kept, base $PINNED"

# --- the README's host step and run ---------------------------------------------------------------
HOST=$(mktemp -d /tmp/nbd-backup-container-test.XXXXXX)
cleanup() {
    "$RT" rm -f "$NAME" >/dev/null 2>&1 || true
    as_root rm -rf "$HOST"
}
trap cleanup EXIT
BACKUPS=$HOST/backups RUN=$HOST/run
as_root install -d -o 10809 -g 10809 -m 0750 "$BACKUPS" "$RUN"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# an argument after the image name: the defaults (QMP socket, NBD on 0.0.0.0, --allow-dir) must stay.
# (podman on a host without systemd prints "unable to get systemd connection to add healthchecks": that
# is its periodic timer; the check itself is run below with `podman healthcheck run`.)
say "$RT run -d --read-only --cap-drop=ALL --security-opt no-new-privileges --tmpfs /tmp -p 127.0.0.1:$PORT:10809 … IMAGE --max-connections 16"
"$RT" run -d --name "$NAME" --read-only --cap-drop=ALL --security-opt no-new-privileges --tmpfs /tmp \
    -p "127.0.0.1:$PORT:10809" -v "$RUN:/run/nbd-backup" -v "$BACKUPS:/backups" "$IMAGE" --max-connections 16 >/dev/null
for _ in $(seq 1 300); do
    "$RT" logs "$NAME" 2>&1 | grep -q '^nbd-backup: ready' && break
    [ "$("$RT" inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "container exited: $("$RT" logs "$NAME" 2>&1)"
    sleep 0.2
done
"$RT" logs "$NAME" 2>&1 | grep '^nbd-backup: ready' >&2 || fail "not ready after 60 s: $("$RT" logs "$NAME" 2>&1)"

# health: podman runs the image's HEALTHCHECK on request; docker has no such command: run its CMD
if [ "$RT" = podman ]; then
    podman healthcheck run "$NAME" >/dev/null || fail "health check failed"
else
    docker exec "$NAME" nbd-backup qmp --qmp unix:/run/nbd-backup/qmp.sock --timeout 5 query-version >/dev/null \
        || fail "health check failed"
fi
say "health check: healthy"
"$RT" run --rm --read-only --cap-drop=ALL --network none "$IMAGE" qemu-img --version | grep -q 'qemu-img version' \
    || fail "qemu-img is not in the image"

qmp() { "$RT" exec "$NAME" nbd-backup qmp --qmp unix:/run/nbd-backup/qmp.sock "$@"; }
# an image made where the daemon sees it, as uid 10809 (blockdev-create over QMP once it exists)
"$RT" exec "$NAME" qemu-img create -q -f qcow2 /backups/disk0.qcow2 64M
owner=$(as_root stat -c %u:%g "$BACKUPS/disk0.qcow2")
[ "$owner" = 10809:10809 ] || fail "image owned by $owner, expected 10809:10809"
qmp blockdev-add driver=qcow2 node-name=disk0 file.driver=file file.filename=/backups/disk0.qcow2 >/dev/null
qmp block-export-add type=nbd id=disk0 node-name=disk0 writable=true >/dev/null
say "image made in the container (owner $owner), added and exported over QMP"

URI=nbd://127.0.0.1:$PORT/disk0
qemu-img info "$URI" | grep -q 'virtual size: 64 MiB' || fail "qemu-img info $URI: $(qemu-img info "$URI" 2>&1)"
qemu-io -f raw -c 'write -q -P 0x5a 0 4M' -c 'write -q -P 0xa5 40M 1M' "$URI" >/dev/null
say "export reached from the host: qemu-img info and qemu-io writes over $URI"

# the QMP socket from the host (root) and from another container (run as 10809:10809)
as_root python3 - "$RUN/qmp.sock" <<'PY' || fail "QMP from the host"
import json, socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    for command in ("qmp_capabilities", "query-block-exports"):
        s.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = json.loads(f.readline())
    assert [e["id"] for e in reply["return"]] == ["disk0"], reply
PY
"$RT" run --rm --user 10809:10809 --read-only --cap-drop=ALL --security-opt no-new-privileges --network none \
    -v "$RUN:/run/nbd-backup" "$IMAGE" nbd-backup qmp --qmp unix:/run/nbd-backup/qmp.sock query-block-exports \
    | grep -q '"disk0"' || fail "QMP from another container"
say "QMP socket used from the host and from another container"

qmp_out=$("$RT" exec "$NAME" nbd-backup backup -q --qmp unix:/run/nbd-backup/qmp.sock disk0 \
    /backups/disk0-backup.qcow2 --format qcow2 2>&1) || fail "backup: $qmp_out"
as_root qemu-img compare -f raw -F qcow2 "$URI" "$BACKUPS/disk0-backup.qcow2" >&2 || fail "backup differs from the export"
say "backup over QMP done; qemu-img compare: export and backup identical"

# stop with a (throttled) backup running: jobs cancelled, images flushed, exit 0, quickly
qmp drive-backup device=disk0 job-id=slow target=/backups/slow.qcow2 format=qcow2 sync=full speed=1048576 >/dev/null
qmp query-block-jobs | grep -q '"slow"' || fail "the throttled backup is not running"
start=$(date +%s.%N)
"$RT" stop -t 10 "$NAME" >/dev/null
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
status=$("$RT" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$status" = 0 ] || fail "exit status $status after stop: $("$RT" logs "$NAME" 2>&1 | tail -5)"
python3 -c "import sys; sys.exit(float(sys.argv[1]) >= 5)" "$elapsed" || fail "stop took $elapsed s"
say "stop with a backup running: exit 0 in $elapsed s"
say "PASSED ($RT)"
