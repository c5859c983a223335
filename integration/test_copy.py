"""``nbd-backup copy`` end to end: files and NBD exports on either side, sparseness kept, progress
reported, and a non-zero exit status with a clear message on every failure."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, nbd_backup_argv, require, run
from peers import make_image, nbdcopy_to_file, nbdkit, our_server, qemu_nbd

SIZE = 8 << 20
# nbdkit's data plugin: bytes at a few offsets, the rest sparse (holes that read as zeroes).
SPARSE_DATA = "1 2 3 @1048576 (0x55)*5000 @5242880 (7 8 9)*70000"


def copy(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(nbd_backup_argv("copy", *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"copy {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def random_sparse_image(path: Path, seed: int = 5) -> bytes:
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for _ in range(12):
        offset, length = rng.randrange(0, SIZE - 100_000), rng.randrange(1, 100_000)
        data[offset : offset + length] = rng.randbytes(length)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for start in range(0, SIZE, 65536):
            block = data[start : start + 65536]
            if any(block):
                f.seek(start)
                f.write(block)
    return bytes(data)


def test_nbd_to_new_file_keeps_holes(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "-r", "data", SPARSE_DATA, f"size={SIZE}") as peer:
        out = tmp_path / "out.img"
        copy(peer.uri, str(out))
        expected = nbdcopy_to_file(peer.uri, tmp_path / "nbdcopy.img")
    assert out.read_bytes() == expected
    assert os.path.getsize(out) == SIZE
    assert allocated(out) < SIZE // 4, "holes were written as data"


def test_file_to_nbd_and_back(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    data = random_sparse_image(source)
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as peer:
        copy(str(source), peer.uri, "--requests", "4", "--request-size", "64K")
        assert nbdcopy_to_file(peer.uri, tmp_path / "back.img") == data
        restored = tmp_path / "restored.img"
        copy(peer.uri, str(restored))
    assert restored.read_bytes() == data
    require("qemu-img")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(restored))


def test_nbd_to_nbd_between_different_servers(tmp_path: Path) -> None:
    source = tmp_path / "q.img"
    data = random_sparse_image(source, seed=9)
    with qemu_nbd(tmp_path, source) as src, nbdkit(tmp_path, "memory", f"size={SIZE}") as dst:
        copy(src.uri, dst.uri, "--connections", "2")
        assert nbdcopy_to_file(dst.uri, tmp_path / "check.img") == data


def test_holes_over_garbage_are_zeroed(tmp_path: Path) -> None:
    """An existing destination full of data: the source's holes must become zeroes there."""
    target = tmp_path / "target.img"
    target.write_bytes(b"\xee" * SIZE)
    with nbdkit(tmp_path, "-r", "data", SPARSE_DATA, f"size={SIZE}") as peer:
        copy(peer.uri, str(target))
        assert target.read_bytes() == nbdcopy_to_file(peer.uri, tmp_path / "expected.img")
    image = make_image(tmp_path / "srv.img", SIZE)
    image.write_bytes(b"\xee" * SIZE)
    source = tmp_path / "sparse.img"
    data = random_sparse_image(source, seed=11)
    with our_server(tmp_path, image) as dst:
        copy(str(source), dst.uri)
    assert image.read_bytes() == data


def test_file_to_file(tmp_path: Path) -> None:
    source = tmp_path / "a.img"
    data = random_sparse_image(source, seed=13)
    copy(str(source), str(tmp_path / "b.img"), "--no-detect-zeroes")
    assert (tmp_path / "b.img").read_bytes() == data


def copy_with_progress_fd(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``nbd-backup [args…] --progress=FD SRC DST`` (the last two of ``args``) and return the
    process and the lines it wrote to FD."""
    *options, src, dst = args
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.run(
            nbd_backup_argv(*options, f"--progress={write_fd}", src, dst),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd) as reader:
            read_fd = -1
            lines = reader.read().splitlines()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    return proc, lines


def test_progress_fd_lines(tmp_path: Path) -> None:
    source = tmp_path / "p.img"
    random_sparse_image(source)
    proc, lines = copy_with_progress_fd("copy", str(source), str(tmp_path / "q.img"))
    assert proc.returncode == 0, proc.stderr
    assert lines[-1] == "100/100"
    percents = [int(line.split("/")[0]) for line in lines]
    assert percents == sorted(percents) and all(line.endswith("/100") for line in lines)


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ("{tmp}/missing.img", "{tmp}/out.img", "cannot open the source"),
        ("nbds://127.0.0.1/x?tls-type=psk", "{tmp}/out.img", "x509 only"),
        ("nbd+unix:///x?socket={tmp}/none.sock", "{tmp}/out.img", "cannot open the source"),
        ("{tmp}/big.img", "{tmp}/small.img", "smaller than the source"),
        ("{tmp}/big.img", "nbd:unix:{tmp}/none.sock", "cannot open the destination"),
    ],
)
def test_failures_exit_non_zero_with_a_message(tmp_path: Path, src: str, dst: str, message: str) -> None:
    make_image(tmp_path / "big.img", SIZE)
    make_image(tmp_path / "small.img", SIZE // 2)
    proc = copy(src.format(tmp=tmp_path), dst.format(tmp=tmp_path), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.img").exists()


def test_read_errors_fail_the_copy_and_remove_the_new_file(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=error", "pattern", f"size={SIZE}", "error-pread=EIO", "error-pread-rate=0.5") as p:
        out = tmp_path / "out.img"
        proc = copy("--request-size", "64K", p.uri, str(out), check=False)  # 128 reads: some fail
    assert proc.returncode == 1
    assert "Input/output error" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_write_errors_fail_the_copy(tmp_path: Path) -> None:
    source = tmp_path / "s.img"
    random_sparse_image(source)
    with nbdkit(
        tmp_path, "--filter=error", "memory", f"size={SIZE}", "error-pwrite=ENOSPC", "error-pwrite-rate=1"
    ) as p:
        proc = copy(str(source), p.uri, check=False)
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr


def test_killing_the_server_mid_copy_fails_quickly(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "pattern", "size=1G", "rdelay=50ms") as peer:
        out = tmp_path / "out.img"
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            nbd_backup_argv("copy", f"--progress={write_fd}", "--requests", "4", peer.uri, str(out)),
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        try:
            with os.fdopen(read_fd) as progress:
                assert progress.readline().strip() == "0/100"  # the copy has started
                time.sleep(0.3)
                peer.kill(signal.SIGKILL)
                _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    assert "connection" in stderr and "lost" in stderr, stderr
    assert "Traceback" not in stderr


def test_qcow2_both_ways(tmp_path: Path) -> None:
    """The restore path for qcow2 backups: images are opened and created through backup.images."""
    require("qemu-img", "qemu-io")
    qcow = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(qcow), str(SIZE))
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x61 0 300k",
        "-c",
        "write -P 0x62 5M 64k",
        "-c",
        "write -z 6M 1M",
        str(qcow),
    )
    raw = tmp_path / "restored.img"
    copy(str(qcow), str(raw))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(raw))
    assert allocated(raw) < SIZE // 2
    again = tmp_path / "again.qcow2"
    copy("-O", "qcow2", str(raw), str(again))
    run("qemu-img", "check", str(again))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(again))
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as peer:
        copy(str(again), peer.uri)
        assert nbdcopy_to_file(peer.uri, tmp_path / "check.img") == raw.read_bytes()
    proc = copy("-f", "raw", str(qcow), str(tmp_path / "x.img"), check=False)
    assert proc.returncode == 1 and "qcow2" in proc.stderr


def test_block_status_errors_fall_back_to_data(tmp_path: Path) -> None:
    with nbdkit(
        tmp_path, "--filter=error", "data", SPARSE_DATA, f"size={SIZE}", "error-extents=EIO", "error-extents-rate=1"
    ) as p:
        out = tmp_path / "out.img"
        copy(p.uri, str(out))
    with nbdkit(tmp_path, "-r", "data", SPARSE_DATA, f"size={SIZE}", name="plain") as plain:
        assert out.read_bytes() == nbdcopy_to_file(plain.uri, tmp_path / "expected.img")


# --- parallel copies: worker processes over multi-conn exports and raw files -----------------------------


def parallel_copy(*args: str, workers: int = 3, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``copy`` with ``--workers`` and info logging, which says how many processes copied."""
    argv = nbd_backup_argv("-v", "copy", "--workers", str(workers), "--request-size", "64K", *args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"copy {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def mapped_data(path: Path) -> int:
    """Bytes ``qemu-img map`` reports as data (holes written as zeroes would count here)."""
    import json

    require("qemu-img")
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


def test_parallel_nbd_to_new_file_keeps_holes(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "-r", "data", SPARSE_DATA, f"size={SIZE}") as peer:
        out = tmp_path / "out.img"
        proc = parallel_copy(peer.uri, str(out))
        expected = nbdcopy_to_file(peer.uri, tmp_path / "nbdcopy.img")
    assert "copying with 3 processes" in proc.stderr
    assert out.read_bytes() == expected
    assert mapped_data(out) < SIZE // 4, "holes were written as data"


def test_parallel_file_to_multi_conn_servers_and_back(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    data = random_sparse_image(source, seed=21)
    target = make_image(tmp_path / "q.img", SIZE)
    target.write_bytes(b"\xee" * SIZE)  # the source's holes must become zeroes there
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as mem, qemu_nbd(tmp_path, target) as qemu:
        for uri in (mem.uri, qemu.uri):
            proc = parallel_copy(str(source), uri)
            assert "copying with 3 processes" in proc.stderr
            assert nbdcopy_to_file(uri, tmp_path / "back.img") == data
        restored = tmp_path / "restored.img"
        proc = parallel_copy(mem.uri, str(restored), workers=2)
        assert "copying with 2 processes" in proc.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(restored))
    assert mapped_data(restored) < SIZE // 2


def test_parallel_file_to_file_with_progress(tmp_path: Path) -> None:
    source = tmp_path / "a.img"
    data = random_sparse_image(source, seed=23)
    target = tmp_path / "b.img"
    target.write_bytes(b"\xee" * SIZE)
    proc, lines = copy_with_progress_fd(
        "-v", "copy", "--workers", "4", "--request-size", "64K", str(source), str(target)
    )
    assert proc.returncode == 0, proc.stderr
    assert "copying with 4 processes" in proc.stderr
    assert target.read_bytes() == data
    percents = [int(line.split("/")[0]) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100


@pytest.mark.parametrize("failing", ["read", "write"])
def test_parallel_worker_failure_stops_all_and_removes_the_new_file(tmp_path: Path, failing: str) -> None:
    out = tmp_path / "out.img"
    if failing == "read":
        server = nbdkit(
            tmp_path, "--filter=error", "pattern", f"size={SIZE}", "error-pread=EIO", "error-pread-rate=0.3"
        )
        with server as p:
            proc = parallel_copy(p.uri, str(out), check=False)  # 128 reads over 3 processes: some fail
    else:
        source = tmp_path / "s.img"
        random_sparse_image(source)
        server = nbdkit(
            tmp_path, "--filter=error", "memory", f"size={SIZE}", "error-pwrite=ENOSPC", "error-pwrite-rate=0.3"
        )
        with server as p:
            proc = parallel_copy(str(source), p.uri, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "copying with 3 processes" in proc.stderr
    message = "Input/output error" if failing == "read" else "No space left on device"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nbd-backup copy:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_single_process_for_qcow2_and_servers_without_multi_conn(tmp_path: Path) -> None:
    require("qemu-img")
    source = tmp_path / "src.img"
    data = random_sparse_image(source, seed=25)
    qcow = tmp_path / "out.qcow2"
    proc = parallel_copy("-O", "qcow2", str(source), str(qcow))
    assert "copying with one process" in proc.stderr and "processes" not in proc.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(qcow))
    back = tmp_path / "back.img"
    proc = parallel_copy(str(qcow), str(back))
    assert "copying with one process" in proc.stderr
    assert back.read_bytes() == data
    with nbdkit(tmp_path, "--filter=multi-conn", "memory", f"size={SIZE}", "multi-conn-mode=disable") as single:
        proc = parallel_copy(str(source), single.uri)
        assert "copying with one process" in proc.stderr and "processes" not in proc.stderr
        assert nbdcopy_to_file(single.uri, tmp_path / "check.img") == data


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.update(int(child) for child in text.split())
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupting_a_parallel_copy_leaves_no_process_behind(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C stops the workers and removes the new file; even a killed parent takes its workers along."""
    with nbdkit(tmp_path, "--filter=delay", "pattern", "size=1G", "rdelay=20ms") as peer:
        out = tmp_path / "out.img"
        read_fd, write_fd = os.pipe()
        argv = nbd_backup_argv("copy", f"--progress={write_fd}", "--workers", "3", peer.uri, str(out))
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT, pass_fds=(write_fd,))
        os.close(write_fd)
        try:
            with os.fdopen(read_fd) as progress:
                assert progress.readline().strip() == "0/100"
                deadline = time.monotonic() + 30
                while len(workers := children_of(proc.pid)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)  # the workers (and multiprocessing's resource tracker) have started
                assert len(workers) >= 2
                proc.send_signal(sig)
                proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert not out.exists()
