"""``NbdClient`` against every real NBD server we know: qemu-nbd, nbdkit (memory, file), nbd-server and
our own ``nbd-backup serve``. What the client learns matches ``nbdinfo``; what it writes reads back with
``nbdcopy`` (and ``qemu-img compare`` for file-backed servers); holes and zeroes survive.

The peer-starting helpers here are shared with the copy, info and error tests of the client area.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, require, run

from nbd import constants as c
from nbd.client import NbdClient
from nbd.constants import State

SIZE = 8 << 20


@dataclass
class Peer:
    """A running NBD server: its URI, the image behind it (when there is one), and how to stop it."""

    kind: str
    uri: str
    image: Path | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pid_file: Path | None = None
    log: Path | None = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server abruptly (the tests of dropped connections use this)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.pid_file is not None and self.pid_file.exists():
            try:
                os.kill(int(self.pid_file.read_text().strip()), sig)
            except (ProcessLookupError, ValueError):
                pass

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""


def _connectable(sock_path: Path | None, port: int | None, host: str = "127.0.0.1") -> bool:
    try:
        if sock_path is not None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock_path))
        else:
            with socket.create_connection((host, port or 0), timeout=1):
                pass
    except OSError:
        return False
    return True


def wait_listening(
    proc: subprocess.Popen[bytes] | None,
    *,
    sock_path: Path | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    log: Path,
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (sock_path is None or sock_path.exists()) and _connectable(sock_path, port, host):
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode} before listening:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    pytest.fail(f"server not listening after 20 s:\n{log.read_text(errors='replace')}")


def start_process(
    argv: list[str],
    tmp: Path,
    name: str,
    *,
    sock_path: Path | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp)
    wait_listening(proc, sock_path=sock_path, port=port, host=host, log=log)
    return proc, log


@contextmanager
def nbdkit(tmp: Path, *args: str, name: str = "nbdkit", sock_path: Path | None = None) -> Iterator[Peer]:
    """``nbdkit -U SOCK -f ARGS…`` (arguments are the plugin, its parameters and any filters)."""
    require("nbdkit")
    sock_path = sock_path or tmp / f"{name}.sock"
    proc, log = start_process(
        ["nbdkit", "-U", str(sock_path), "-f", "--exit-with-parent", *args], tmp, name, sock_path=sock_path
    )
    peer = Peer("nbdkit", f"nbd+unix:///?socket={sock_path}", procs=[proc], log=log)
    try:
        yield peer
    finally:
        peer.kill(signal.SIGTERM)


@contextmanager
def qemu_nbd(tmp: Path, image: Path, *, export: str = "disk", extra: tuple[str, ...] = ()) -> Iterator[Peer]:
    require("qemu-nbd")
    sock_path = tmp / "qemu-nbd.sock"
    argv = ["qemu-nbd", "-k", str(sock_path), "-f", "raw", "-x", export, "-t", "--shared=8", *extra, str(image)]
    proc, log = start_process(argv, tmp, "qemu-nbd", sock_path=sock_path)
    peer = Peer("qemu-nbd", f"nbd+unix:///{export}?socket={sock_path}", image=image, procs=[proc], log=log)
    try:
        yield peer
    finally:
        peer.kill(signal.SIGTERM)


@contextmanager
def nbd_server(tmp: Path, image: Path, *, export: str = "disk") -> Iterator[Peer]:
    """The reference ``nbd-server`` (it daemonizes: it is stopped through its pid file)."""
    require("nbd-server")
    port = free_port()
    config = tmp / "nbd-server.conf"
    pid_file = tmp / "nbd-server.pid"
    config.write_text(
        "[generic]\n"
        "    listenaddr = 127.0.0.1\n"
        f"    port = {port}\n"
        "    allowlist = true\n"
        f"[{export}]\n"
        f"    exportname = {image}\n"
        "    trim = true\n"
        "    flush = true\n"
        "    fua = true\n"
    )
    log = tmp / "nbd-server.log"
    with open(log, "wb") as err:
        subprocess.run(["nbd-server", "-C", str(config), "-p", str(pid_file)], stderr=err, check=True, timeout=30)
    peer = Peer("nbd-server", f"nbd://127.0.0.1:{port}/{export}", image=image, pid_file=pid_file, log=log)
    try:
        wait_listening(None, port=port, log=log)
        yield peer
    finally:
        peer.kill(signal.SIGTERM)


@contextmanager
def our_server(tmp: Path, image: Path, *, export: str = "disk") -> Iterator[Peer]:
    from nbd_serve import serve

    with serve(tmp, [f"{export}={image}"]) as served:
        yield Peer("nbd-backup", served.uri(export, "unix"), image=image, procs=[served.proc], log=served.log)


def make_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def peer_of_kind(kind: str, tmp: Path) -> Iterator[Peer]:
    if kind == "nbdkit-memory":
        with nbdkit(tmp, "memory", f"size={SIZE}") as peer:
            yield peer
    elif kind == "nbdkit-file":
        image = make_image(tmp / "nbdkit.img")
        with nbdkit(tmp, "file", str(image)) as peer:
            peer.image = image
            yield peer
    elif kind == "qemu-nbd":
        with qemu_nbd(tmp, make_image(tmp / "qemu.img")) as peer:
            yield peer
    elif kind == "nbd-server":
        with nbd_server(tmp, make_image(tmp / "nbd-server.img")) as peer:
            yield peer
    elif kind == "nbd-backup":
        with our_server(tmp, make_image(tmp / "ours.img")) as peer:
            yield peer
    else:
        raise AssertionError(kind)


KINDS = ["qemu-nbd", "nbdkit-memory", "nbdkit-file", "nbd-server", "nbd-backup"]


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    with peer_of_kind(request.param, tmp_path) as server:
        yield server


def nbdinfo_json(uri: str, *extra: str) -> dict:
    """``nbdinfo --json``, run outside the repository (libnbd's Python module is also called nbd)."""
    require("nbdinfo")
    return json.loads(run("nbdinfo", "--json", *extra, uri, cwd="/").stdout)


def nbdcopy_to_file(uri: str, path: Path) -> bytes:
    require("nbdcopy")
    run("nbdcopy", uri, str(path), cwd="/")
    return path.read_bytes()


# --- the tests -------------------------------------------------------------------------------------------


_FLAGS = {
    "is_read_only": c.TransmissionFlag.READ_ONLY,
    "is_rotational": c.TransmissionFlag.ROTATIONAL,
    "can_flush": c.TransmissionFlag.SEND_FLUSH,
    "can_fua": c.TransmissionFlag.SEND_FUA,
    "can_trim": c.TransmissionFlag.SEND_TRIM,
    "can_zero": c.TransmissionFlag.SEND_WRITE_ZEROES,
    "can_fast_zero": c.TransmissionFlag.SEND_FAST_ZERO,
    "can_cache": c.TransmissionFlag.SEND_CACHE,
    "can_multi_conn": c.TransmissionFlag.CAN_MULTI_CONN,
    "can_df": c.TransmissionFlag.SEND_DF,
}


async def test_size_and_flags_match_nbdinfo(peer: Peer) -> None:
    theirs = nbdinfo_json(peer.uri)["exports"][0]
    client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        info = client.export_info
        if peer.kind == "nbd-server":
            # nbdinfo 1.14 misreads nbd-server 3.24's NBD_OPT_INFO size as 0; --size uses GO, like we do.
            theirs["export-size"] = int(run("nbdinfo", "--size", peer.uri, cwd="/").stdout)
        assert info.size == client.size == theirs["export-size"] == SIZE
        for key, flag in _FLAGS.items():
            assert bool(info.flags & flag) == theirs[key], key
        assert list(info.contexts) == theirs.get("contexts", [])
        for ours, key in (
            (info.block_minimum, "block_size_minimum"),
            (info.block_preferred, "block_size_preferred"),
            (info.block_maximum, "block_size_maximum"),
        ):
            assert ours == theirs.get(key)
        assert client.capabilities.can_extents == ("base:allocation" in theirs.get("contexts", []))
    finally:
        await client.close()


async def test_written_data_reads_back_with_nbdcopy(peer: Peer, tmp_path: Path) -> None:
    rng = random.Random(7)
    model = bytearray(SIZE)
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=16), 30)
    try:
        writes = []
        for offset, length in [(0, 4096), (4096 * 3 + 17, 70_001), (1 << 20, 1 << 20), (SIZE - 513, 513)]:
            data = rng.randbytes(length)
            model[offset : offset + length] = data
            writes.append(client.pwrite(offset, data))
        await asyncio.wait_for(asyncio.gather(*writes), 30)
        await client.pwrite(3 << 20, rng.randbytes(65536), fua=True)
        model[3 << 20 : (3 << 20) + 65536] = await client.pread(3 << 20, 65536)
        # Zeroes, with and without permission to punch holes, and a trim (contents then unspecified,
        # so we re-zero it afterwards).
        await client.zero((1 << 20) + 4096, 65536, may_trim=True)
        model[(1 << 20) + 4096 : (1 << 20) + 4096 + 65536] = bytes(65536)
        await client.zero(100, 1000)
        model[100:1100] = bytes(1000)
        await client.trim(5 << 20, 1 << 20)
        await client.zero(5 << 20, 1 << 20, may_trim=True)
        await client.flush()
        await client.cache(0, 1 << 20)
        for offset, length in [(0, SIZE), (4096 * 3, 100_000), (SIZE - 600, 600)]:
            assert await client.pread(offset, length) == model[offset : offset + length]
    finally:
        await client.close()
    assert nbdcopy_to_file(peer.uri, tmp_path / "readback.img") == model
    if peer.image is not None:
        expected = tmp_path / "expected.img"
        expected.write_bytes(model)
        require("qemu-img")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), str(peer.image))


async def test_holes_and_zeroes_survive(peer: Peer) -> None:
    client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        await client.pwrite(0, b"\xaa" * SIZE)
        await client.zero(1 << 20, 2 << 20, may_trim=True)
        assert await client.pread(1 << 20, 2 << 20) == bytes(2 << 20)
        extents = await client.block_status(0, SIZE)
        assert sum(e.length for e in extents) <= SIZE
        if client.capabilities.can_extents:
            covered = 0
            for extent in extents:
                start, end = covered, covered + extent.length
                if start >= 1 << 20 and end <= 3 << 20:
                    assert extent.flags & State.ZERO, extents
                if end <= 1 << 20:
                    assert not extent.flags & State.ZERO, extents
                covered = end
            first_zero = await client.block_status(1 << 20, 4096)
            assert first_zero[0].flags & State.ZERO
    finally:
        await client.close()


async def test_pipelined_reads_over_several_connections(peer: Peer) -> None:
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=32), 30)
    try:
        if client.capabilities.can_multi_conn:
            assert client.connections > 1
        else:
            assert client.connections == 1
        data = random.Random(3).randbytes(SIZE)
        await client.pwrite(0, data)
        chunks = await asyncio.wait_for(
            asyncio.gather(*(client.pread(offset, 65536) for offset in range(0, SIZE, 65536))), 60
        )
        assert b"".join(chunks) == data
    finally:
        await client.close()


async def test_our_server_round_trip_in_process(tmp_path: Path) -> None:
    """Our client against our server in one process (no peer needed), both loops' code paths."""
    from backup.memory import MemoryDevice
    from nbd.server import Export, NbdServer

    server = NbdServer()
    device = MemoryDevice(SIZE)
    server.add_export(Export("mem", device, description="in-process"))
    sock_path = tmp_path / "ours.sock"
    await server.listen_unix(sock_path)
    try:
        client = await NbdClient.connect(f"nbd+unix:///mem?socket={sock_path}")
        try:
            assert client.export_info.description == "in-process"
            payload = random.Random(1).randbytes(3 << 20)
            await client.pwrite(12345, payload)
            assert await client.pread(12345, len(payload)) == payload
            assert device.data[12345 : 12345 + len(payload)] == payload
        finally:
            await client.close()
        assert [e.name for e in await NbdClient.list_exports(f"nbd+unix:///?socket={sock_path}")] == ["mem"]
    finally:
        await server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "legacy"])
async def test_tcp_uris(family: str, tmp_path: Path) -> None:
    """nbd://127.0.0.1:PORT/, nbd://[::1]:PORT/ and QEMU's nbd:HOST:PORT:exportname=X over real TCP."""
    require("nbdkit")
    if family == "ipv6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    host = "::1" if family == "ipv6" else "127.0.0.1"
    port = free_port()
    argv = ["nbdkit", "-i", host, "-p", str(port), "-f", "--exit-with-parent", "-e", "exp", "memory", f"size={SIZE}"]
    proc, _ = start_process(argv, tmp_path, "tcp", port=port, host=host)
    try:
        uri = {
            "ipv4": f"nbd://127.0.0.1:{port}/exp",
            "ipv6": f"nbd://[::1]:{port}/exp",
            "legacy": f"nbd:127.0.0.1:{port}:exportname=exp",
        }[family]
        client = await asyncio.wait_for(NbdClient.connect(uri), 10)
        try:
            assert client.size == SIZE
            await client.pwrite(0, b"tcp")
            assert await client.pread(0, 3) == b"tcp"
        finally:
            await client.close()
    finally:
        proc.terminate()
        proc.wait(10)
