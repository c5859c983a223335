"""Our daemon under big and hostile traffic: requests at the advertised 32 MiB maximum answered once,
memory bounded (measured as the daemon's RSS) when clients pipeline reads they never read, stall in
the middle of write payloads or open many silent sockets."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import nbd_backup_argv, require, run
from peers import serve

from nbd import constants as c
from nbd import wire
from nbd.constants import Cmd, Opt, Rep

MiB = 1 << 20


def test_qemu_io_writes_and_reads_32_mib(tmp_path: Path) -> None:
    """Writes over 16 MiB used to be answered twice (OK, then EIO): the read after got the stale
    EIO. qemu-io checks every reply's content and status."""
    require("qemu-io")
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(64 * MiB))
    with serve(tmp_path, [f"disk={image},format=raw"]) as served:
        uri = served.uri("disk")
        commands = ["write -P 0x5a 0 32M", "read -P 0x5a 0 32M", "write -P 0x3c 32M 20M", "read -P 0x3c 32M 20M"]
        argv = ["qemu-io", "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        out = run(*argv, uri).stdout
        assert out.count("wrote") == 2 and out.count("read ") == 2, out
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        assert "Traceback" not in served.stderr()


# --- memory under hostile clients --------------------------------------------------------------------


class RawNbd:
    """A blocking NBD client by hand: negotiates, then sends whatever it is told and reads nothing."""

    def __init__(self, port: int | Path, export: str = "disk") -> None:
        if isinstance(port, Path):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            self.sock.connect(str(port))
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # little room for replies
        self._exactly(18)  # greeting
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes; simple replies only
        data = wire.InfoRequest.build({"name": export, "requests": []})
        self.sock.sendall(wire.OptionHeader.build({"option": Opt.GO, "length": len(data)}) + data)
        while True:
            header = wire.OptionReplyHeader.parse(self._exactly(20))
            self._exactly(header.length)
            if header.reply != Rep.INFO:
                assert header.reply == Rep.ACK, header
                return

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the server hung up"
            data += chunk
        return data

    def requests(self, cmd: int, count: int, length: int, *, first_cookie: int = 0) -> bytes:
        return b"".join(
            wire.REQUEST_FAST.pack(c.REQUEST_MAGIC, 0, cmd, first_cookie + i, 0, length) for i in range(count)
        )

    def read_round_trip(self) -> None:
        """One small read, answered: by then the server has been through everything sent before on
        other connections too (one event loop)."""
        self.sock.sendall(wire.REQUEST_FAST.pack(c.REQUEST_MAGIC, 0, Cmd.READ, 1 << 40, 0, 512))
        magic, error, cookie = struct.unpack(">IIQ", self._exactly(16))
        assert (magic, error, cookie) == (c.SIMPLE_REPLY_MAGIC, 0, 1 << 40)
        self._exactly(512)

    def close(self) -> None:
        self.sock.close()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth_mib(pid: int, before_kib: int) -> float:
    """How far the daemon's peak RSS (VmHWM) rose above ``before_kib``, in MiB."""
    return (status_kib(pid, "VmHWM") - before_kib) / 1024


def settle(probe: RawNbd, rounds: int = 20) -> None:
    """Round trips on an honest connection, a few, so whatever the flood set off has run."""
    for _ in range(rounds):
        probe.read_round_trip()


def watch_growth(pid: int, before_kib: int, probe: RawNbd, bound_mib: float = 200, samples: int = 20) -> float:
    """The daemon's peak growth, watched for a while (round trips and short sleeps, a bounded
    number): the sockets of a flood are served in no particular order relative to the probe's."""
    growth = 0.0
    for _ in range(samples):
        settle(probe, 2)
        time.sleep(0.05)
        growth = peak_growth_mib(pid, before_kib)
        if growth >= bound_mib:
            break
    return growth


def make_data_image(path: Path, fmt: str, size_mib: int = 64) -> Path:
    """An image full of data (no holes, so no read can be answered with a hole)."""
    raw = path.with_suffix(".src")
    block = bytes((i * 7 + 1) & 0xFF or 1 for i in range(MiB))
    with open(raw, "wb") as f:
        for _ in range(size_mib):
            f.write(block)
    if fmt == "raw":
        raw.rename(path)
    else:
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, path)
        raw.unlink()
    return path


READ_FLOOD = [(2000, 256 << 10), (24, 32 << 20)]  # (count, length) of pipelined READs never read


@pytest.mark.parametrize(
    ("fmt", "sendfile"), [("qcow2", True), ("raw", True), ("raw", False)], ids=["qcow2", "raw-sendfile", "raw-pread"]
)
def test_unread_read_replies_are_bounded(tmp_path: Path, fmt: str, sendfile: bool) -> None:
    """Pipelined READs whose replies are never read: the daemon stops reading requests once its reply
    budget is used, rather than queueing every reply (2,000 READs of 256 KiB grew it by 418 MiB; 24 of 32 MiB
    on a read-only qcow2 export by 768 MiB)."""
    require("qemu-img")
    image = make_data_image(tmp_path / f"disk.{fmt}", fmt)
    env = dict(os.environ, NBD_BACKUP_SENDFILE_MIN="262144" if sendfile else "0")
    with serve(tmp_path, [f"disk={image},readonly,format={fmt}"], env=env) as served:
        pid = served.proc.pid
        probe = RawNbd(served.socket)  # another client than the flood's 127.0.0.1
        probe.read_round_trip()
        before = status_kib(pid, "VmRSS")
        flooders = []
        for count, length in READ_FLOOD:
            flooder = RawNbd(served.port)
            flooder.sock.sendall(flooder.requests(Cmd.READ, count, length))
            flooders.append(flooder)
        growth = watch_growth(pid, before, probe)
        for flooder in flooders:
            flooder.close()
        probe.read_round_trip()  # still serving
        probe.close()
        assert growth < 200, f"the daemon grew by {growth:.0f} MiB"


def send_what_fits(sock: socket.socket, data: memoryview) -> int:
    """Send without blocking; returns how much the kernel took."""
    sent = 0
    while sent < len(data):
        try:
            n = sock.send(data[sent : sent + (1 << 20)])
        except BlockingIOError:
            break
        if not n:
            break
        sent += n
    return sent


@pytest.mark.parametrize("stall_at", ["start", "end"])
def test_stalled_write_payloads_are_bounded(tmp_path: Path, stall_at: str) -> None:
    """Sixteen connections each send a 32 MiB WRITE and stall one byte into its payload (each pinned
    32 MiB: the buffer was allocated in full at the header), or 4 KiB before its end (the daemon
    reads what its budget allows and leaves the rest in the kernel's socket buffers)."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    length = 32 * MiB
    with serve(tmp_path, [f"disk={image},format=raw"]) as served:
        pid = served.proc.pid
        probe = RawNbd(served.socket)  # another client than the flood's 127.0.0.1
        probe.read_round_trip()
        before = status_kib(pid, "VmRSS")
        payload = memoryview(bytes([0x5A]) * (1 if stall_at == "start" else length - 4096))
        writers = []
        for i in range(16):
            writer = RawNbd(served.port)
            header = wire.REQUEST_FAST.pack(c.REQUEST_MAGIC, 0, Cmd.WRITE, i, 0, length)
            writer.sock.sendall(header + payload[:1])
            writer.sock.setblocking(False)
            writers.append([writer, 1])
        for _ in range(10_000):  # until no connection takes any more
            progress = 0
            for entry in writers:
                writer, sent = entry
                n = send_what_fits(writer.sock, payload[sent:])
                entry[1] = sent + n
                progress += n
            settle(probe, 1)
            if not progress:
                break
        growth = watch_growth(pid, before, probe)
        for writer, _ in writers:
            writer.close()
        probe.read_round_trip()
        probe.close()
        assert growth < 200, f"the daemon grew by {growth:.0f} MiB"


def test_copy_with_32_mib_requests(tmp_path: Path) -> None:
    """Our own client at the advertised maximum: ``copy --request-size 32M`` used to stop with
    "reply for unknown cookie" (the second reply to a big write)."""
    source = make_data_image(tmp_path / "src.raw", "raw")
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    with serve(tmp_path, [f"disk={image},format=raw"]) as served:
        run(*nbd_backup_argv("copy", "--no-progress", "--request-size", "32M", source, served.uri("disk")))
        back = tmp_path / "back.raw"
        run(*nbd_backup_argv("copy", "--no-progress", "--request-size", "32M", served.uri("disk"), back))
        assert "Traceback" not in served.stderr()
    assert back.read_bytes() == source.read_bytes()


def test_silent_and_idle_sockets_do_not_lock_clients_out(tmp_path: Path) -> None:
    """100 sockets from one address that never finish the handshake used to fill every slot for the
    handshake timeout (10 s), again and again; a negotiated client that idles kept its slot forever."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(MiB)
    with serve(tmp_path, [f"disk={image},format=raw"], "--idle-timeout", "1") as served:
        silent = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            silent.append(sock)
        real = RawNbd(served.socket)  # another client: it gets in at once
        real.read_round_trip()
        idle = RawNbd(served.port)  # 127.0.0.1 itself: a silent one made room
        idle.sock.settimeout(20)
        assert idle.sock.recv(1) == b""  # closed by the daemon after --idle-timeout
        real.close()
        idle.close()
        for sock in silent:
            sock.close()
