"""QMP monitor benchmark: the stream parser alone, then request/reply rates over a unix socket against
``nbd-backup serve`` and against ``qemu-storage-daemon`` (same client, same commands).

Run: ``.venv/bin/python bench/bench_qmp.py`` (prints a table; the machine is shared, numbers are noisy).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.qmp.framing import JsonStreamParser  # noqa: E402


def best_of(runs: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(runs))


def parse_small(n: int = 50_000) -> tuple[float, float]:
    data = b"".join(
        json.dumps({"execute": "block-job-set-speed", "arguments": {"device": f"job{i}", "speed": i}, "id": i}).encode()
        for i in range(n)
    )

    def run() -> float:
        parser = JsonStreamParser()
        start = time.perf_counter()
        count = 0
        for i in range(0, len(data), 65536):
            count += len(parser.feed(data[i : i + 65536]))
        assert count == n
        return time.perf_counter() - start

    elapsed = best_of(3, run)
    baseline = best_of(3, lambda: _json_loads_baseline(data, n))
    return n / elapsed, n / baseline


def _json_loads_baseline(data: bytes, n: int) -> float:
    """The stdlib parser on the same messages, split by a raw_decode loop (no incremental input)."""
    decoder = json.JSONDecoder()
    text = data.decode()
    start = time.perf_counter()
    pos = count = 0
    while pos < len(text):
        _, pos = decoder.raw_decode(text, pos)
        count += 1
    assert count == n
    return time.perf_counter() - start


def parse_big(size: int = 32 << 20) -> float:
    data = b'{"execute":"x","id":"' + b"a" * size + b'"}'

    def run() -> float:
        parser = JsonStreamParser()
        start = time.perf_counter()
        out = []
        for i in range(0, len(data), 65536):
            out.extend(parser.feed(data[i : i + 65536]))
        assert len(out) == 1
        return time.perf_counter() - start

    return size / best_of(3, run) / 1e6


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.buf = b""
        self.recv()
        self.sock.sendall(b'{"execute":"qmp_capabilities"}')
        self.recv()

    def recv(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(1 << 16)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def sequential(self, n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            self.sock.sendall(b'{"execute":"query-block-jobs","id":%d}' % i)
            self.recv()
        return n / (time.perf_counter() - start)

    def pipelined(self, n: int) -> float:
        burst = b"".join(b'{"execute":"query-block-jobs","id":%d}' % i for i in range(n))
        start = time.perf_counter()
        self.sock.sendall(burst)
        for _ in range(n):
            self.recv()
        return n / (time.perf_counter() - start)

    def refused(self, n: int) -> float:
        """Validation failures: arguments checked against the schema, error replies."""
        start = time.perf_counter()
        for i in range(n):
            self.sock.sendall(b'{"execute":"block-job-set-speed","arguments":{"device":1,"speed":1},"id":%d}' % i)
            self.recv()
        return n / (time.perf_counter() - start)


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(500):
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not appear")


def measure_daemon(argv: list[str], path: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        wait_socket(path, proc)
        time.sleep(0.2)
        client = Client(path)
        result = {
            "sequential": best_of(3, lambda: client.sequential(2000)),
            "pipelined": best_of(3, lambda: client.pipelined(2000)),
            "refused": best_of(3, lambda: client.refused(2000)),
        }
        client.sock.close()
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    print("QMP stream parser (one process, 64 KiB chunks)")
    ours, stdlib = parse_small()
    print(f"  small commands:        {ours:>12,.0f} msg/s   (stdlib json raw_decode: {stdlib:,.0f} msg/s)")
    print(f"  one 32 MiB string:     {parse_big():>12,.0f} MB/s")
    print()
    print("request/reply over a unix socket, 2000 commands, best of 3 (commands per second)")
    print(f"  {'server':<34}{'sequential':>12}{'pipelined':>12}{'refused':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        rows: list[tuple[str, dict[str, float]]] = []
        for loop in ("uvloop", "asyncio"):
            path = Path(tmp) / f"ours-{loop}.sock"
            env = {**os.environ, "NBD_BACKUP_LOOP": loop}
            argv = [sys.executable, "-m", "server.cli", "serve", "--qmp", f"unix:{path}"]
            rows.append((f"nbd-backup serve ({loop})", measure_daemon(argv, path, env)))
        qsd = shutil.which("qemu-storage-daemon")
        if qsd:
            path = Path(tmp) / "qsd.sock"
            argv = [qsd, "--chardev", f"socket,id=m,path={path},server=on,wait=off", "--monitor", "chardev=m"]
            rows.append(("qemu-storage-daemon 7.2", measure_daemon(argv, path)))
        for name, r in rows:
            print(f"  {name:<34}{r['sequential']:>12,.0f}{r['pipelined']:>12,.0f}{r['refused']:>12,.0f}")


if __name__ == "__main__":
    main()
