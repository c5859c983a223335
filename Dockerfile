# nbd-backup: the daemon as a small container image.
#
#   docker build -t nbd-backup .
#   docker run -d --name nbd-backup -p 127.0.0.1:10809:10809 \
#       -v nbd-backup-run:/run/nbd-backup -v /srv/backups:/backups nbd-backup
#
# The QMP monitor is the unix socket /run/nbd-backup/qmp.sock (a volume, so other containers or the
# host can reach it); images and backups live under /backups, the only directory QMP clients may
# open or create files in (--allow-dir). NBD listens on port 10809 (all interfaces of the container:
# publish it on 127.0.0.1 unless the network is trusted) and serves what block-export-add exports.
# SIGTERM (docker stop) cancels running jobs, flushes the images and exits 0.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbd ./nbd
COPY backup ./backup
COPY server ./server
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10809 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin nbd-backup \
    && install -d -o nbd-backup -g nbd-backup -m 0750 /run/nbd-backup /backups
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER nbd-backup
WORKDIR /backups
VOLUME ["/run/nbd-backup", "/backups"]
EXPOSE 10809
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["nbd-backup", "qmp", "--qmp", "unix:/run/nbd-backup/qmp.sock", "--timeout", "5", "query-version"]
ENTRYPOINT ["nbd-backup", "serve"]
CMD ["--qmp", "unix:/run/nbd-backup/qmp.sock", "--nbd", "0.0.0.0:10809", "--allow-dir", "/backups", \
     "--pid-file", "/run/nbd-backup/serve.pid"]
