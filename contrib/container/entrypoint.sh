#!/bin/bash
# nbd-backup-entrypoint: the container's ENTRYPOINT. It runs `nbd-backup serve` with the image's
# defaults merged with the arguments given after the image name:
#   - a default is dropped only when the same option is given (--nbd, --qmp, --allow-dir, --pid-file;
#     as "--opt VALUE" or "--opt=VALUE"); every other default stays, and the arguments are added after
#     the defaults (so an option given once, like --max-connections, is the user's);
#   - a first argument "serve" is skipped (`docker run IMAGE serve --export …` works too);
#   - a first argument "--no-defaults" drops every default (use it with --config FILE that sets them);
#   - a first argument that is not an option runs that command instead (`IMAGE qemu-img info …`,
#     `IMAGE nbd-backup qmp …`, `IMAGE sh`).
set -euo pipefail

DEFAULTS=(
    --qmp unix:/run/nbd-backup/qmp.sock
    --nbd 0.0.0.0:10809
    --allow-dir /backups
    --pid-file /run/nbd-backup/serve.pid
)

case "${1-}" in
serve) shift ;;
"" | -*) ;;
*) exec "$@" ;;
esac
if [ "${1-}" = --no-defaults ]; then
    shift
    exec nbd-backup serve "$@"
fi

given() {
    local option=$1 arg
    shift
    for arg in "$@"; do
        case $arg in "$option" | "$option"=*) return 0 ;; esac
    done
    return 1
}

merged=()
for ((i = 0; i < ${#DEFAULTS[@]}; i += 2)); do
    given "${DEFAULTS[i]}" "$@" || merged+=("${DEFAULTS[i]}" "${DEFAULTS[i + 1]}")
done
exec nbd-backup serve "${merged[@]}" "$@"
