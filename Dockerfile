# nbd-backup: the daemon as a small container image (README "Container": the commands for a fresh host).
#
#   docker build -t nbd-backup .                  # podman: podman build --format docker -t nbd-backup .
#   install -d -o 10809 -g 10809 -m 0750 /srv/backups /run/nbd-backup
#   docker run -d --name nbd-backup --read-only --cap-drop=ALL --security-opt no-new-privileges \
#       --tmpfs /tmp -p 127.0.0.1:10809:10809 \
#       -v /run/nbd-backup:/run/nbd-backup -v /srv/backups:/backups nbd-backup
#
# The daemon runs as uid:gid 10809:10809 (user and group "nbd-backup"). The QMP monitor is the unix
# socket /run/nbd-backup/qmp.sock (mode 0600: root on the host, or a container run with
# --user 10809:10809, can use it); images and backups live under /backups, the only directory QMP
# clients may open or create files in (--allow-dir). NBD listens on port 10809 (all interfaces of the
# container: publish it on 127.0.0.1 unless the network is trusted). Arguments after the image name
# are merged with these defaults by contrib/container/entrypoint.sh (a default goes only when its
# option is given). SIGTERM (docker stop) cancels running jobs, flushes the images and exits 0.
#
# The base is pinned to an exact tag: Python 3.11 on Debian 12 (bookworm), the release qemu-utils
# comes from. Pin it by digest as well for reproducible builds:
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:<digest> -t nbd-backup .
# (the digest from `docker buildx imagetools inspect python:3.11-slim-bookworm` or `skopeo inspect`).
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbd ./nbd
COPY backup ./backup
COPY server ./server
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE}
# qemu-utils: qemu-img/qemu-io in the image, to make, inspect and compare images where the daemon sees them
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-utils \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10809 nbd-backup \
    && useradd --system --uid 10809 --gid 10809 --home-dir /nonexistent --shell /usr/sbin/nologin nbd-backup \
    && install -d -o 10809 -g 10809 -m 0750 /run/nbd-backup /backups
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY contrib/container/entrypoint.sh /usr/local/bin/nbd-backup-entrypoint
# Python writes no .pyc files at run time (the root file system may be --read-only)
ENV PYTHONDONTWRITEBYTECODE=1
USER 10809:10809
WORKDIR /backups
VOLUME ["/run/nbd-backup", "/backups"]
EXPOSE 10809
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["nbd-backup", "qmp", "--qmp", "unix:/run/nbd-backup/qmp.sock", "--timeout", "5", "query-version"]
ENTRYPOINT ["/usr/local/bin/nbd-backup-entrypoint"]
CMD []
