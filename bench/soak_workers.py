"""The load of ``bench/soak.py``: each worker is a thread running one kind of client in a bounded loop.

Every worker loops until the soak's ``stop`` event is set; every external tool runs with a timeout and is
killed when it passes; every socket has a timeout. A worker counts what it did in ``Soak.counts`` and
reports failures in two kinds: ``wrong`` (data that differs from what it must be: never acceptable) and
``unexpected`` (a well-behaved client or a job that should have succeeded failed). Hostile clients'
own failures are what they are for and are not counted as either.

Regions: the writable exports (``raw`` and ``q``, same size) are split so that no two workers write the
same bytes, which keeps each worker's own read-back check exact while everything runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbd import constants as c

MiB = 1 << 20
TOOL_TIMEOUT = 180.0  # no single tool run may take longer (a hung peer is killed and counted)
JOB_TIMEOUT = 240.0  # a backup job that has not ended by then is force-cancelled and counted
SOCK_TIMEOUT = 60.0

# disjoint byte ranges of the writable exports: (offset, length)
REGION_FIO = (0, 64 * MiB)
REGION_OWN = (64 * MiB, 32 * MiB)
REGION_QEMU_IO = (96 * MiB, 32 * MiB)
REGION_HOSTILE = (128 * MiB, 64 * MiB)


@dataclass
class Soak:
    """What the workers share: where things are, the stop flag, counters and the processes they started."""

    work: Path
    port: int
    nbd_sock: Path
    qmp_sock: Path
    quiet: Path  # the read-only export's image: the oracle for every read of ``quiet``
    size: int  # of the writable exports
    quiet_size: int
    fault: Path  # present = nbdkit targets/sources with the error filter fail
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    procs: set[subprocess.Popen[bytes]] = field(default_factory=set)
    seq: Iterator[int] = field(default_factory=lambda: iter(range(1 << 62)))

    def uri(self, export: str, rnd: random.Random) -> str:
        if rnd.random() < 0.5:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.nbd_sock}"

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def fail(self, kind: str, worker: str, text: str) -> None:
        """``kind`` is "wrong" or "unexpected"; the first messages are printed as they happen."""
        line = f"[{time.strftime('%H:%M:%S')}] {kind} {worker}: {text.strip()[-600:]}"
        with self.lock:
            self.counts[kind] += 1
            self.counts[f"{kind}:{worker}"] += 1
            self.messages.append(line)
            shown = len(self.messages) <= 30
        if shown:
            print(line, flush=True)

    def next_id(self) -> int:
        with self.lock:
            return next(self.seq)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True while the soak goes on."""
        return not self.stop.wait(seconds)


# --- running tools -------------------------------------------------------------------------------


def run_tool(soak: Soak, argv: Sequence[str | os.PathLike[str]], timeout: float = TOOL_TIMEOUT) -> tuple[int, str]:
    """Run a tool (from / : libnbd's Python module is also called nbd) and return (status, output);
    killed after ``timeout`` (status -9 then)."""
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/",
        start_new_session=True,
    )
    with soak.lock:
        soak.procs.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        out += b"\n(killed after timeout)"
    finally:
        with soak.lock:
            soak.procs.discard(proc)
    return proc.returncode, out.decode(errors="replace")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


@contextlib.contextmanager
def nbdkit(soak: Soak, name: str, *args: str) -> Iterator[Path]:
    """``nbdkit -U SOCK ARGS…`` for the ``with`` block (ready once its pid file is written); yields the socket."""
    sock = soak.work / f"{name}.sock"
    pid_file = soak.work / f"{name}.pid"
    log = soak.work / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["nbdkit", "-U", str(sock), "-P", str(pid_file), "-f", "--exit-with-parent", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with soak.lock:
        soak.procs.add(proc)
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit {name} did not start: {log.read_text(errors='replace')[-400:]}")
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
        with soak.lock:
            soak.procs.discard(proc)
        for path in (sock, pid_file, log):
            path.unlink(missing_ok=True)


def same_file(a: Path, b: Path, length: int | None = None) -> str | None:
    """None when the first ``length`` bytes (default: all) of both files are equal, else where they differ."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while length is None or pos < length:
            want = MiB if length is None else min(MiB, length - pos)
            x, y = fa.read(want), fb.read(want)
            if x != y:
                first = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
                return f"{a.name} and {b.name} differ at byte {pos + first}"
            if not x:
                return None
            pos += len(x)
    return None


# --- a raw NBD client, for what well-behaved tools never do --------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def raw_connect(soak: Soak, rnd: random.Random) -> socket.socket:
    if rnd.random() < 0.5:
        sock = socket.create_connection(("127.0.0.1", soak.port), timeout=SOCK_TIMEOUT)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SOCK_TIMEOUT)
        sock.connect(str(soak.nbd_sock))
    return sock


def raw_negotiate(sock: socket.socket, export: str) -> int:
    """Fixed newstyle handshake with NBD_OPT_GO (simple replies only); returns the export size."""
    magic, ihaveopt, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    if magic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT:
        raise ConnectionError("not an NBD newstyle server")
    sock.sendall(struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.Opt.GO, len(data)) + data)
    size = -1
    while True:
        _magic, _opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
        body = recv_exact(sock, length)
        if c.rep_is_error(rep):
            raise ConnectionError(f"NBD_OPT_GO refused: {rep:#x} {body!r}")
        if rep == c.Rep.INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == c.Info.EXPORT:
            size = struct.unpack(">Q", body[2:10])[0]
        if rep == c.Rep.ACK:
            return size


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def read_simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    if magic != c.SIMPLE_REPLY_MAGIC:
        raise ConnectionError(f"bad reply magic {magic:#x}")
    return error, cookie


def abort_close(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0), as a crashed client's kernel would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- the workers ---------------------------------------------------------------------------------


Worker = Callable[[Soak, random.Random], None]


def loop(soak: Soak, name: str, body: Worker, pause: tuple[float, float], seed: int) -> None:
    """Run ``body`` until the soak stops; an exception in it counts as unexpected (the loop goes on)."""
    rnd = random.Random(seed)
    while not soak.stop.is_set():
        try:
            body(soak, rnd)
            soak.count(f"ops:{name}")
        except Exception as exc:
            cause = exc.__context__
            also = f" (while handling {type(cause).__name__}: {cause})" if cause is not None else ""
            soak.fail("unexpected", name, f"{type(exc).__name__}: {exc}{also}")
        if not soak.sleep(rnd.uniform(*pause)):
            return


def fio_worker(soak: Soak, rnd: random.Random) -> None:
    """fio's nbd engine: random writes with verification on a writable export, or random reads of ``quiet``."""
    if rnd.random() < 0.6:
        export = rnd.choice(["raw", "q"])
        bs = rnd.choice(["4k", "64k", "1m"])
        offset, length = REGION_FIO
        argv = [
            f"--name=soak-{export}",
            "--rw=randwrite",
            f"--bs={bs}",
            f"--offset={offset}",
            f"--size={length}",
            f"--io_size={rnd.choice([4, 16, 32])}m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            f"--randseed={rnd.getrandbits(31)}",
        ]
        what = "wrong"
    else:
        export = "quiet"
        argv = [
            "--name=soak-read",
            "--rw=randread",
            "--bsrange=4k-1m",
            "--time_based",
            f"--runtime={rnd.randint(2, 8)}",
        ]
        what = "unexpected"
    status, out = run_tool(
        soak, ["fio", "--ioengine=nbd", f"--uri={soak.uri(export, rnd)}", f"--iodepth={rnd.choice([1, 8, 32])}", *argv]
    )
    if status != 0:
        soak.fail("wrong" if "verify" in out and what == "wrong" else "unexpected", "fio", out)


def qemu_io_worker(soak: Soak, rnd: random.Random) -> None:
    """qemu-io: patterned writes, zeroes and discards in its region, each read back with ``read -P``."""
    offset, length = REGION_QEMU_IO
    cmds: list[str] = []
    for _ in range(rnd.randint(4, 24)):
        size = rnd.choice([512, 4096, 65536, 1 << 20, 4 << 20])
        at = offset + rnd.randrange(0, length - size + 1, 512)
        pattern = rnd.randrange(256)
        kind = rnd.random()
        if kind < 0.7:
            cmds += ["-c", f"write -P {pattern} {at} {size}", "-c", f"read -P {pattern} {at} {size}"]
        elif kind < 0.9:
            cmds += ["-c", f"write -z {at} {size}", "-c", f"read -P 0 {at} {size}"]
        else:
            cmds += [
                "-c",
                f"aio_write -P {pattern} {at} {size}",
                "-c",
                "aio_flush",
                "-c",
                f"read -P {pattern} {at} {size}",
            ]
    cmds += ["-c", "flush"]
    export = rnd.choice(["raw", "q"])
    status, out = run_tool(soak, ["qemu-io", "-f", "raw", *cmds, soak.uri(export, rnd)])
    failed = "\n".join(line for line in out.splitlines() if "fail" in line or "error" in line.lower())
    if "Pattern verification failed" in out and "write failed" not in out:
        soak.fail("wrong", "qemu-io", failed)
    elif status != 0 or failed:
        soak.fail("unexpected", "qemu-io", failed or out)


def own_client_worker(soak: Soak, rnd: random.Random) -> None:
    """Our NbdClient: random writes (some FUA), zeroes and trims in its region, every one read back."""
    asyncio.run(_own_client(soak, rnd))


async def _own_client(soak: Soak, rnd: random.Random) -> None:
    from nbd.client import NbdClient

    offset, length = REGION_OWN
    export = rnd.choice(["raw", "q"])
    client = await NbdClient.connect(soak.uri(export, rnd), connections=rnd.choice([1, 2, 4]))
    try:
        for _ in range(rnd.randint(8, 64)):
            size = rnd.choice([512, 4096, 65536, 1 << 20, 4 << 20])
            at = offset + rnd.randrange(0, length - size + 1, 512)
            kind = rnd.random()
            if kind < 0.75:
                data = rnd.randbytes(size)
                await client.pwrite(at, data, fua=rnd.random() < 0.2)
            else:
                data = bytes(size)
                await client.zero(at, size)
            got = await client.pread(at, size)
            if got != data:
                soak.fail("wrong", "own-client", f"{export}: read back {size} bytes at {at} differ")
                return
        await client.flush()
    finally:
        await client.close()


def reader_worker(soak: Soak, rnd: random.Random) -> None:
    """Whole-disk readers: nbdcopy, qemu-img convert/compare and ``nbd-backup copy`` of ``quiet``
    (compared with its image), or nbdcopy of a busy export into ``null:``."""
    kind = rnd.choice(["nbdcopy", "convert", "compare", "ours", "busy"])
    out_path = soak.work / f"read-{soak.next_id()}.raw"
    try:
        quiet = soak.uri("quiet", rnd)
        if kind == "nbdcopy":
            argv: list[str] = ["nbdcopy", f"--requests={rnd.choice([4, 16, 64])}", quiet, str(out_path)]
        elif kind == "convert":
            argv = ["qemu-img", "convert", "-f", "raw", "-O", "raw", "-W", quiet, str(out_path)]
        elif kind == "compare":
            argv = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(soak.quiet), quiet]
        elif kind == "ours":
            request_size = rnd.choice(["64K", "1M", "4M"])
            argv = [sys.executable, "-m", "server.cli", "copy", "--no-progress", f"--request-size={request_size}"]
            argv += [quiet, str(out_path)]
        else:
            argv = ["nbdcopy", soak.uri(rnd.choice(["raw", "q"]), rnd), "null:"]
        if kind == "ours":
            status, out = _run_ours(soak, argv)
        else:
            status, out = run_tool(soak, argv)
        if kind == "compare" and status == 1:
            soak.fail("wrong", "reader", f"qemu-img compare: {out}")
        elif status != 0:
            soak.fail("unexpected", f"reader-{kind}", out)
        elif kind in ("nbdcopy", "convert", "ours"):
            diff = same_file(soak.quiet, out_path)
            if diff is not None:
                soak.fail("wrong", f"reader-{kind}", diff)
    finally:
        out_path.unlink(missing_ok=True)


def _run_ours(soak: Soak, argv: list[str]) -> tuple[int, str]:
    """Our CLI runs from the repository (cwd matters: it is imported from there)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root)
    with soak.lock:
        soak.procs.add(proc)
    try:
        out, _ = proc.communicate(timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    finally:
        with soak.lock:
            soak.procs.discard(proc)
    return proc.returncode, out.decode(errors="replace")


def pipelined_reader_worker(soak: Soak, rnd: random.Random) -> None:
    """A raw client that pipelines many READs of ``quiet`` and checks every reply's cookie and bytes:
    a reply answered twice or misattributed shows up here."""
    sock = raw_connect(soak, rnd)
    with open(soak.quiet, "rb") as image, contextlib.closing(sock):
        size = raw_negotiate(sock, "quiet")
        wanted: dict[int, tuple[int, int]] = {}
        for batch in range(rnd.randint(1, 8)):
            reqs = []
            for i in range(rnd.randint(1, 64)):
                length = rnd.choice([512, 4096, 65536, 256 << 10, 1 << 20])
                at = rnd.randrange(0, size - length + 1, 512)
                cookie = (batch << 16) | i
                wanted[cookie] = (at, length)
                reqs.append(request(c.Cmd.READ, cookie, at, length))
            sock.sendall(b"".join(reqs))
            while wanted:
                error, cookie = read_simple_reply(sock)
                if cookie not in wanted:
                    soak.fail("wrong", "pipelined-reader", f"reply for unknown cookie {cookie:#x} (error {error})")
                    return
                at, length = wanted.pop(cookie)
                if error:
                    soak.fail("unexpected", "pipelined-reader", f"READ {length}@{at} failed with {error}")
                    return
                data = recv_exact(sock, length)
                image.seek(at)
                if data != image.read(length):
                    soak.fail("wrong", "pipelined-reader", f"READ {length}@{at}: data differ from the image")
                    return
        sock.sendall(request(c.Cmd.DISC, 0, 0, 0))


def hostile_worker(soak: Soak, rnd: random.Random) -> None:
    """One hostile client: silent, idle after GO, pipelining without reading replies, disconnecting in the
    middle of a write payload or of a read reply, or sending garbage. The daemon may drop it any time."""
    kind = rnd.choice(["silent", "idle", "no-read", "mid-payload", "mid-reply", "garbage", "half-header"])
    soak.count(f"hostile:{kind}")
    try:
        _hostile(soak, rnd, kind)
    except (OSError, ConnectionError):
        soak.count("hostile:dropped")


def _hostile(soak: Soak, rnd: random.Random, kind: str) -> None:
    sock = raw_connect(soak, rnd)
    try:
        if kind == "silent":
            soak.stop.wait(rnd.uniform(1, 15))
            return
        export = rnd.choice(["raw", "q", "quiet"])
        size = raw_negotiate(sock, export)
        writable = export != "quiet"
        offset, length = REGION_HOSTILE
        if kind == "idle":
            soak.stop.wait(rnd.uniform(1, 20))
        elif kind == "no-read":
            # moderate: the daemon has a known unbounded-reply-memory bug with clients that do not read
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            n, each = rnd.randint(8, 32), rnd.choice([64 << 10, 256 << 10])
            sock.sendall(b"".join(request(c.Cmd.READ, i, rnd.randrange(0, size - each, 512), each) for i in range(n)))
            soak.stop.wait(rnd.uniform(1, 8))
        elif kind == "mid-payload" and writable:
            each = rnd.choice([64 << 10, 1 << 20, 4 << 20])
            at = offset + rnd.randrange(0, length - each + 1, 512)
            sock.sendall(request(c.Cmd.WRITE, 1, at, each) + os.urandom(rnd.randrange(0, each)))
            soak.stop.wait(rnd.uniform(0, 2))
        elif kind == "mid-reply":
            each = rnd.choice([1 << 20, 4 << 20])
            at = rnd.randrange(0, size - each, 512)
            sock.sendall(request(c.Cmd.READ, 1, at, each))
            recv_exact(sock, rnd.randrange(16, each // 2))
        elif kind == "half-header":
            sock.sendall(request(c.Cmd.READ, 1, 0, 4096)[: rnd.randrange(1, 28)])
            soak.stop.wait(rnd.uniform(0, 3))
        else:  # garbage (also mid-payload on a read-only export: a write there is refused)
            sock.sendall(os.urandom(rnd.choice([1, 27, 28, 512, 65536])))
            soak.stop.wait(rnd.uniform(0, 2))
    finally:
        if rnd.random() < 0.5:
            abort_close(sock)
        else:
            sock.close()


# --- backups over QMP ----------------------------------------------------------------------------


def qmp(soak: Soak) -> Any:
    from qsd import QmpSync  # type: ignore[import-not-found]

    return QmpSync(soak.qmp_sock, timeout=60)


def wait_end(soak: Soak, q: Any, job: str, *, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """The job's BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED event data (``event`` key added), waiting at
    most JOB_TIMEOUT (``tick`` is called about once a second meanwhile); a job still there then is
    force-cancelled and reported as ``STUCK``. Events that arrived while a command was answered are
    queued in ``q.pending_events`` and looked at first; other jobs' events stay queued (another
    ``wait_end`` on this connection may want them)."""
    ends = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    deadline = time.monotonic() + JOB_TIMEOUT
    next_tick = time.monotonic() + 1
    while True:
        for index, msg in enumerate(q.pending_events):
            data = msg.get("data", {})
            if msg["event"] in ends and job in (data.get("device"), data.get("id")):
                del q.pending_events[index]
                return {"event": msg["event"], **data}
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_tick:
            if tick is not None:
                tick()
            next_tick = time.monotonic() + 1
            continue
        try:
            q._record_message(q._read(min(deadline, next_tick)))
        except TimeoutError:
            pass
    from qsd import job_events_of  # type: ignore[import-not-found]

    state = [j for j in q.ok("query-block-jobs") if j["device"] == job]
    events = job_events_of(q.transcript.events(), job)
    soak.fail("unexpected", "backup", f"job {job} did not end within {JOB_TIMEOUT} s: {state}; events: {events}")
    q.execute("block-job-cancel", device=job, force=True)
    return {"event": "STUCK"}


def settle(soak: Soak, q: Any, job: str, worker: str) -> None:
    """After the job's end event, the job must be gone (auto-dismiss); if not, report it with the events
    this connection saw for it, and force-cancel it so the soak goes on."""
    from qsd import job_events_of  # type: ignore[import-not-found]

    left = [j for j in q.ok("query-block-jobs") if j["device"] == job]
    if not left:
        return
    events = job_events_of(q.transcript.events(), job)
    soak.fail("unexpected", worker, f"{job} still listed after its end event: {left[0]}; events: {events}")
    q.execute("block-job-cancel", device=job, force=True)
    wait_end(soak, q, job)


def oracle_backup_worker(soak: Soak, rnd: random.Random) -> None:
    """``drive-backup`` (or a ``transaction`` of two) of the read-only ``quiet`` export to raw/qcow2 files,
    run to completion and compared with the image."""
    n = soak.next_id()
    fmts = [rnd.choice(["raw", "qcow2"]) for _ in range(1 if rnd.random() < 0.7 else 2)]
    targets = [soak.work / f"oracle-{n}-{i}.{fmt}" for i, fmt in enumerate(fmts)]
    jobs = [f"oracle-{n}-{i}" for i in range(len(fmts))]
    try:
        with qmp(soak) as q:
            actions = [
                {"job-id": job, "device": "quiet", "target": str(t), "sync": "full", "format": fmt}
                for job, t, fmt in zip(jobs, targets, fmts, strict=True)
            ]
            if len(actions) == 1:
                q.ok("drive-backup", actions[0])
            else:
                q.ok("transaction", actions=[{"type": "drive-backup", "data": a} for a in actions])
            ends = {job: wait_end(soak, q, job) for job in jobs}
            for job in jobs:
                settle(soak, q, job, "oracle-backup")
        for (job, end), target, fmt in zip(ends.items(), targets, fmts, strict=True):
            if end["event"] != "BLOCK_JOB_COMPLETED" or "error" in end:
                soak.fail("unexpected", "oracle-backup", f"{job}: {end}")
                continue
            diff = _compare_image(soak, target, fmt)
            if diff is not None:
                soak.fail("wrong", "oracle-backup", f"{job} ({fmt}): {diff}")
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def _compare_image(soak: Soak, target: Path, fmt: str) -> str | None:
    if fmt == "raw":
        if target.stat().st_size != soak.quiet_size:
            return f"target is {target.stat().st_size} bytes, source {soak.quiet_size}"
        return same_file(soak.quiet, target)
    status, out = run_tool(soak, ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(soak.quiet), str(target)])
    return None if status == 0 else out


def busy_backup_worker(soak: Soak, rnd: random.Random) -> None:
    """Backups of the busy writable exports to files or an nbdkit target, at a limited speed so they
    last seconds: cancelled mid-way, paused and resumed, sped up, or left to complete (``sync=none``
    ones always cancelled)."""
    n = soak.next_id()
    job = f"busy-{n}"
    device = rnd.choice(["raw", "q"])
    action = rnd.choice(["cancel", "pause", "complete", "speed", "none"])
    target_kind = "file" if action == "none" else rnd.choice(["file", "file", "nbd"])
    # sync=none: the target's backing file is the source, which a raw image cannot name
    fmt = "qcow2" if action == "none" else rnd.choice(["raw", "qcow2"])
    target = soak.work / f"{job}.{fmt}"
    speed = rnd.choice([32, 64, 128]) * MiB
    try:
        with contextlib.ExitStack() as stack:
            q = stack.enter_context(qmp(soak))
            args: dict[str, Any] = {"job-id": job, "device": device, "speed": speed}
            args["sync"] = "none" if action == "none" else "full"
            if target_kind == "file":
                command = "drive-backup"
                args |= {"target": str(target), "format": fmt}
            else:
                sock = stack.enter_context(nbdkit(soak, f"busy-target-{n}", "memory", str(soak.size)))
                node = f"busy-target-{n}"
                server = {"type": "unix", "path": str(sock)}
                q.ok("blockdev-add", driver="nbd", server=server, **{"node-name": node})
                stack.callback(_blockdev_del, q, node)
                command = "blockdev-backup"
                args["target"] = node
            q.ok(command, args)
            time.sleep(rnd.uniform(0.2, 3))
            if action in ("cancel", "none"):
                _tolerant(q, "block-job-cancel", device=job)
            elif action == "pause":
                _tolerant(q, "block-job-pause", device=job)
                time.sleep(rnd.uniform(0.2, 2))
                _tolerant(q, "block-job-resume", device=job)
            elif action == "speed":
                _tolerant(q, "block-job-set-speed", device=job, speed=0)
            end = wait_end(soak, q, job)
            settle(soak, q, job, "busy-backup")
            if "error" in end or end["event"] == "STUCK":
                soak.fail("unexpected", f"busy-backup-{action}", f"{job} ({target_kind}): {end}")
            soak.count(f"backup:{end['event']}")
    finally:
        target.unlink(missing_ok=True)


def _tolerant(q: Any, command: str, **args: Any) -> None:
    """A job verb that may race with the job's end ("not found" is then fine; anything else is not)."""
    reply = q.execute(command, **args)
    desc = reply["error"]["desc"].lower() if "error" in reply else ""
    if desc and "not found" not in desc and "not active" not in desc:
        raise RuntimeError(f"{command}: {reply['error']}")


def _blockdev_del(q: Any, node: str) -> None:
    reply = q.execute("blockdev-del", **{"node-name": node})
    if "error" in reply:
        raise RuntimeError(f"blockdev-del {node}: {reply['error']}")


def fault_backup_worker(soak: Soak, rnd: random.Random) -> None:
    """Backups through nbdkit's error and delay filters while ``fault_toggler`` switches the trigger file:
    a failing target (writes EIO/ENOSPC) or a failing source (reads EIO), with a random error policy.
    ``stop`` pauses are resumed; a job that completes without error under ``report``/``stop`` must have
    copied every byte."""
    n = soak.next_id()
    job = f"fault-{n}"
    policy = rnd.choice(["report", "ignore", "stop"])
    side = rnd.choice(["target", "target", "source"])
    err = rnd.choice(["EIO", "ENOSPC"]) if side == "target" else "EIO"
    rate = rnd.choice(["1", "0.2", "0.02"])
    delay = [f"delay-write={rnd.choice([0, 1, 5])}ms", f"delay-read={rnd.choice([0, 1, 5])}ms"]
    filters = ["--filter=error", "--filter=delay"]
    target = soak.work / f"{job}.raw"
    resumes = 0

    with contextlib.ExitStack() as stack:
        q = stack.enter_context(qmp(soak))
        node = f"fault-node-{n}"
        if side == "target":
            args = [*filters, "memory", str(soak.quiet_size), f"error-pwrite={err}", f"error-pwrite-rate={rate}"]
            sock = stack.enter_context(nbdkit(soak, node, *args, f"error-pwrite-file={soak.fault}", *delay))
        else:
            args = [*filters, "-r", "file", str(soak.quiet), f"error-pread={err}", f"error-pread-rate={rate}"]
            sock = stack.enter_context(nbdkit(soak, node, *args, f"error-pread-file={soak.fault}", *delay))
        q.ok("blockdev-add", driver="nbd", server={"type": "unix", "path": str(sock)}, **{"node-name": node})
        stack.callback(_blockdev_del, q, node)
        stack.callback(target.unlink, missing_ok=True)
        if side == "target":
            q.ok("blockdev-backup", {"job-id": job, "device": "quiet", "target": node, "sync": "full",
                                     "on-target-error": policy})  # fmt: skip
        else:
            q.ok("drive-backup", {"job-id": job, "device": node, "target": str(target), "sync": "full",
                                  "format": "raw", "on-source-error": policy})  # fmt: skip

        def resume() -> None:
            """Resume the job when an error paused it (``stop``), a bounded number of times."""
            nonlocal resumes
            mine = [j for j in q.ok("query-block-jobs") if j["device"] == job]
            if mine and mine[0]["status"] == "paused" and resumes < 200:
                resumes += 1
                reply = q.execute("block-job-resume", device=job)
                soak.count("fault:resume-refused" if "error" in reply else "fault:resumed")

        end = wait_end(soak, q, job, tick=resume)
        settle(soak, q, job, f"fault-backup-{policy}")
        soak.count(f"fault:{policy}:{end['event']}{':error' if 'error' in end else ''}")
        if end["event"] == "STUCK":
            return
        if end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end and policy != "ignore":
            if side == "target":
                status, out = run_tool(soak, ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(soak.quiet),
                                              f"nbd+unix:///?socket={sock}"])  # fmt: skip
                if status == 1:
                    soak.fail("wrong", f"fault-backup-{policy}", f"{job}: target differs: {out}")
                elif status != 0:
                    soak.fail("unexpected", "fault-backup", f"{job}: compare failed: {out}")
            else:
                diff = same_file(soak.quiet, target)
                if diff is not None:
                    soak.fail("wrong", f"fault-backup-{policy}", f"{job} (source faults): {diff}")


def fault_toggler(soak: Soak, rnd: random.Random) -> None:
    """Switch the faults on for a while, then off for a while (the nbdkit error filters watch the file)."""
    with contextlib.suppress(FileExistsError):
        soak.fault.touch(exist_ok=False)
    soak.count("faults:on")
    soak.sleep(rnd.uniform(0.2, 3))
    soak.fault.unlink(missing_ok=True)
    soak.sleep(rnd.uniform(0.5, 6))


WORKERS: list[tuple[str, Worker, tuple[float, float]]] = [
    ("fio", fio_worker, (0.2, 2)),
    ("qemu-io", qemu_io_worker, (0.2, 2)),
    ("own-client", own_client_worker, (0.2, 2)),
    ("reader", reader_worker, (0.5, 3)),
    ("pipelined-reader", pipelined_reader_worker, (0.2, 2)),
    ("hostile-1", hostile_worker, (0.1, 1)),
    ("hostile-2", hostile_worker, (0.1, 1)),
    ("hostile-3", hostile_worker, (0.1, 1)),
    ("oracle-backup", oracle_backup_worker, (0.5, 4)),
    ("busy-backup", busy_backup_worker, (0.5, 3)),
    ("fault-backup", fault_backup_worker, (0.5, 3)),
    ("fault-toggler", fault_toggler, (0, 0)),
]
