"""Our daemon under big and hostile traffic: requests at the advertised 32 MiB maximum answered once,
memory bounded (measured as the daemon's RSS) when clients pipeline reads they never read, stall in
the middle of write payloads or open many silent sockets."""

from __future__ import annotations

from pathlib import Path

from conftest import require, run
from peers import serve

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
