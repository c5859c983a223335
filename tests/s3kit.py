"""A real S3 server for the tests (moto in a subprocess, on loopback) and a fault-injecting proxy for it.

moto answers conditional PUTs, listings and copies like S3 but cannot fail on purpose, so the proxy
in front of it does: 5xx bursts, throttling (503 SlowDown), a connection reset in the middle of an
upload (before or after the server stored it), or a store that is down altogether.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

_SERVER = """
import json, sys, threading
from collections import Counter
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
from moto.server import MotoRequestHandler

counts, lock = Counter(), threading.Lock()
app = DomainDispatcherApplication(create_backend_app)

def op(environ):
    m, path, q = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
    if path.strip("/").count("/") == 0:  # the bucket itself (path-style addressing)
        return {"GET": "LIST", "POST": "POST"}.get(m, m + " bucket") if "versions" not in q else "LIST versions"
    if m == "PUT" and "HTTP_X_AMZ_COPY_SOURCE" in environ:
        return "COPY"
    if m == "PUT" and "retention" in q:
        return "PUT retention"
    if m == "GET" and "HTTP_RANGE" in environ:
        return "GET range"
    return m

def counting(environ, start_response):
    name = op(environ)
    with lock:
        counts[name] += 1
    return app(environ, start_response)

s = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
threading.Thread(target=s.serve_forever, daemon=True).start()
print(s.server_address[1], flush=True)
for line in sys.stdin:  # "counts": the requests served so far, by kind; end of input: stop
    with lock:
        print(json.dumps(dict(counts)), flush=True)
s.shutdown()
"""


class MotoServer:
    """``moto_server`` on 127.0.0.1 in its own process (its CPU is not the test's)."""

    def __init__(self) -> None:
        env = {**os.environ, **CREDENTIALS}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self, endpoint: str | None = None):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def counts(self) -> dict[str, int]:
        """Requests served so far by kind (HEAD, GET, GET range, PUT, COPY, DELETE, LIST, ...)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        counts: dict[str, int] = json.loads(self.proc.stdout.readline())
        return counts

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def location(endpoint: str, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"


@dataclass
class Faults:
    """What the proxy does to the next requests; each counter counts down as requests come."""

    errors: list[tuple[int, str]] = field(default_factory=list)  # (status, code) for the next requests
    reset_put_before: int = 0  # chunk PUTs cut after half the body (the server stores nothing)
    reset_put_after: int = 0  # PUTs forwarded (stored), then the connection reset before the answer
    reset_put_after_match: str = ""  # ... only PUTs whose target contains this
    down: bool = False  # every connection closed at once
    refused: int = 0  # requests met while down
    seen: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rst(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that forwards each request to moto unless ``faults`` say otherwise."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults = Faults()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        reader = conn.makefile("rb")
        try:
            while True:
                if self.faults.down:
                    self.faults.refused += 1
                    reader.close()
                    _rst(conn)
                    return
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: list[tuple[str, str]] = []
                while (h := reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers.append((k.strip(), v.strip()))
                length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
                if any(k.lower() == "expect" and v.lower() == "100-continue" for k, v in headers):
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                f = self.faults
                with f.lock:
                    f.seen.append(f"{method} {target}")
                    error = f.errors.pop(0) if f.errors else None
                    cut_before = method == "PUT" and "/chunks/" in target and f.reset_put_before > 0
                    if cut_before:
                        f.reset_put_before -= 1
                    cut_after = (
                        method == "PUT"
                        and f.reset_put_after > 0
                        and f.reset_put_after_match in target
                        and not cut_before
                    )
                    if cut_after:
                        f.reset_put_after -= 1
                if cut_before:
                    reader.read(length // 2)
                    reader.close()  # the file object holds the socket open: close both to reset it
                    _rst(conn)
                    return
                body = reader.read(length) if length else b""
                if error is not None:
                    status, code = error
                    xml = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    conn.sendall(
                        f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                        f"Content-Length: {len(xml)}\r\n\r\n".encode()
                        + (b"" if method == "HEAD" else xml)
                    )
                    continue
                upstream.request(method, target, body=body, headers=dict(headers))
                r = upstream.getresponse()
                data = r.read()
                if cut_after:
                    reader.close()
                    _rst(conn)
                    return
                out = [f"HTTP/1.1 {r.status} {r.reason}\r\n"]
                drop = ("transfer-encoding", "connection") + (() if method == "HEAD" else ("content-length",))
                for k, v in r.getheaders():
                    if k.lower() not in drop:
                        out.append(f"{k}: {v}\r\n")
                if method != "HEAD":
                    out.append(f"Content-Length: {len(data)}\r\n")
                out.append("\r\n")
                conn.sendall("".join(out).encode("latin-1") + (b"" if method == "HEAD" else data))
        except OSError:
            return
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                reader.close()
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
