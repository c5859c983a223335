"""Persistent dirty bitmaps end to end, differential: the same sequences against qemu-storage-daemon
7.2 and our daemon on the same kind of qcow2 image, and the images each leaves read by QEMU's tools.

- QEMU's bitmaps (made by ``qemu-img bitmap``, recorded by ``qemu-io``) are listed by both with the
  same ``dirty-bitmaps`` fields; ours (``persistent: true`` over QMP) reach the image at the node's
  clean close (``blockdev-del``, daemon shutdown), removed ones leave it, and ``qemu-img info``,
  ``qemu-img bitmap --merge`` and ``qemu-nbd -B`` + ``nbdinfo --map`` see the same on both images;
  they come back after a clean restart.
- After ``kill -9`` the bitmaps on the image come back ``inconsistent`` (and not recording), and every
  QMP use of them is refused with QEMU's text; removing them is allowed and takes them off the image.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import require
from peers import qemu_nbd
from qmp_daemon import start_daemon
from qsd import QmpSync, Qsd

SIZE = 4 << 20
Reply = Any


def _run(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done
    return done.stdout


def _qemu_img_bitmaps(image: Path) -> Any:
    info = json.loads(_run("qemu-img", "info", "--output=json", image))
    return info["format-specific"]["data"].get("bitmaps")


def _nbdinfo_map(tmp: Path, image: Path, bitmap: str) -> str:
    with qemu_nbd(tmp, image, extra=("-f", "qcow2", "-r", "-B", bitmap), name=f"qnbd-{bitmap}") as peer:
        return _run("nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", peer.uri)


class Side:
    """One daemon kind: started over QMP in a directory of its own, stopped cleanly or killed."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.work, self.starts = kind, work, 0

    @contextmanager
    def daemon(self, *, kill: bool = False) -> Iterator[QmpSync]:
        """A fresh daemon process (a new directory for its sockets); ``kill``: SIGKILL at the end."""
        self.starts += 1
        where = self.work / f"run{self.starts}"
        if self.kind == "qsd":
            qsd = Qsd(where)
            qsd.launch()
            try:
                with qsd.connect() as q:
                    yield q
            finally:
                assert qsd.proc is not None
                if kill:
                    qsd.proc.send_signal(signal.SIGKILL)
                    qsd.proc.wait(timeout=30)
                qsd.stop()
            return
        ours = start_daemon(where)
        try:
            with ours.connect() as q:
                yield q
        finally:
            if kill:
                ours.proc.send_signal(signal.SIGKILL)
                ours.proc.wait(timeout=30)
            else:
                assert ours.stop() == 0, ours.stderr()


def _record(out: list[Reply], q: QmpSync, command: str, **args: Any) -> Reply:
    reply = q.execute(command, args)
    out.append((command, ("error", reply["error"]["class"], reply["error"]["desc"]) if "error" in reply else "ok"))
    return reply


def _listed(out: list[Reply], q: QmpSync, node: str = "d") -> Any:
    for entry in q.ok("query-named-block-nodes"):
        if entry["node-name"] == node:
            bitmaps = [b for b in entry.get("dirty-bitmaps", []) if "name" in b]
            out.append(("dirty-bitmaps", bitmaps))
            return bitmaps
    out.append(("dirty-bitmaps", "no node"))
    return None


def _open(q: QmpSync, image: Path) -> None:
    q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "d-file"})
    q.ok("blockdev-add", driver="qcow2", file="d-file", **{"node-name": "d"})


def _close(q: QmpSync) -> None:
    q.ok("blockdev-del", **{"node-name": "d"})
    q.ok("blockdev-del", **{"node-name": "d-file"})


def _guest_writes(q: QmpSync, work: Path, *commands: str) -> None:
    """qemu-io through the daemon's writable NBD export of node ``d``."""
    sock = work / "nbd.sock"
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.ok("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "d"})
    argv = ["qemu-io", "-f", "raw", f"nbd+unix:///d?socket={sock}"]
    for command in commands:
        argv += ["-c", command]
    _run(*argv)
    q.ok("block-export-del", id="e")
    q.wait_event("BLOCK_EXPORT_DELETED", timeout=60)
    q.ok("nbd-server-stop")


def _qemu_image(work: Path) -> Path:
    """A qcow2 image with QEMU's own bitmaps: ``q`` recording (qemu-io's writes land in it), ``q-off``
    disabled, ``gone`` (to be removed over QMP)."""
    image = work / "d.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE))
    _run("qemu-img", "bitmap", "--add", "-g", "4096", image, "q")
    _run("qemu-img", "bitmap", "--add", "--disable", image, "q-off")
    _run("qemu-img", "bitmap", "--add", image, "gone")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 7 8k 1000", "-c", "write -z 1M 70k", image)
    return image


def _differential(tmp_path: Path, scenario: Callable[[Side, Path], list[Reply]]) -> list[Reply]:
    require("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    results = []
    for kind in ("qsd", "ours"):
        work = tmp_path / kind
        work.mkdir()
        results.append(scenario(Side(kind, work), _qemu_image(work)))
    theirs, ours = results
    assert ours == theirs
    return ours


def _clean_scenario(side: Side, image: Path) -> list[Reply]:
    out: list[Reply] = []
    with side.daemon() as q:
        _open(q, image)
        _listed(out, q)  # QEMU's bitmaps, read
        _record(out, q, "block-dirty-bitmap-add", node="d", name="p", persistent=True)
        _record(
            out, q, "block-dirty-bitmap-add", node="d", name="p512", persistent=True, granularity=512, disabled=True
        )
        _record(out, q, "block-dirty-bitmap-add", node="d", name="temp")
        _record(out, q, "block-dirty-bitmap-remove", node="d", name="gone")
        _guest_writes(q, side.work, "write -P 1 100k 4k", "write -P 2 1000k 200k", f"write -z {SIZE - 512} 512")
        _record(out, q, "block-dirty-bitmap-merge", node="d", target="p512", bitmaps=["p"])
        _listed(out, q)
        _close(q)  # a clean close stores them
        out.append(("qemu-img info", _qemu_img_bitmaps(image)))
        _open(q, image)
        _listed(out, q)  # back after a reopen, ``temp`` gone with the node
    out.append(("qemu-img info after shutdown", _qemu_img_bitmaps(image)))
    with side.daemon() as q:
        _open(q, image)
        _listed(out, q)  # back after a clean restart
        _guest_writes(q, side.work, "write -P 3 3M 64k")
        _listed(out, q)
    _run("qemu-img", "bitmap", "--add", "--merge", "p", "-f", "qcow2", image, "m")
    _run("qemu-img", "bitmap", "--merge", "q", "-f", "qcow2", image, "m")
    out.append(("nbdinfo --map m", _nbdinfo_map(side.work, image, "m")))
    out.append(("nbdinfo --map p512", _nbdinfo_map(side.work, image, "p512")))
    out.append(("qemu-img info at the end", _qemu_img_bitmaps(image)))
    _run("qemu-img", "check", "-q", image)  # no leaks or corruption from the bitmaps' rewrites
    return out


def test_persistent_bitmaps_survive_close_and_restart_and_qemu_reads_them(tmp_path: Path) -> None:
    out = _differential(tmp_path, _clean_scenario)
    final = {b["name"]: b for b in dict(out)["qemu-img info at the end"]}
    assert sorted(final) == ["m", "p", "p512", "q", "q-off"]  # "gone" removed, "temp" never stored
    assert final["p"]["flags"] == ["auto"] and final["p512"]["flags"] == [] and final["p512"]["granularity"] == 512
    # "m" = p (the guest's writes, rounded to 64 KiB) merged with q (qemu-io's before we opened the image)
    assert _dirty(dict(out)["nbdinfo --map m"]) == [
        (0, 131072),
        (983040, 262144),
        (3 << 20, 65536),
        (SIZE - 65536, 65536),
    ]


def _dirty(nbdinfo_map: str) -> list[tuple[int, int]]:
    """The dirty extents of an ``nbdinfo --map`` listing."""
    rows = [line.split() for line in nbdinfo_map.splitlines()]
    return [(int(r[0]), int(r[1])) for r in rows if r[-1] == "dirty"]


def _crash_scenario(side: Side, image: Path) -> list[Reply]:
    out: list[Reply] = []
    with side.daemon() as q:  # "p" stored by a clean close first
        _open(q, image)
        _record(out, q, "block-dirty-bitmap-add", node="d", name="p", persistent=True)
    with side.daemon(kill=True) as q:
        _open(q, image)
        _record(out, q, "block-dirty-bitmap-add", node="d", name="lost", persistent=True)  # never stored
        _record(out, q, "block-dirty-bitmap-remove", node="d", name="gone")  # off the image at once
        _guest_writes(q, side.work, "write -P 5 0 64k")
    out.append(("qemu-img info after kill -9", _qemu_img_bitmaps(image)))
    with side.daemon() as q:
        _open(q, image)
        listed = _listed(out, q)
        assert listed and all(b["inconsistent"] and not b["recording"] for b in listed), listed
        sock = side.work / "nbd2.sock"
        _record(out, q, "nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        _record(out, q, "block-export-add", type="nbd", id="x", **{"node-name": "d"}, bitmaps=["p"])
        _record(
            out, q, "block-export-add", type="nbd", id="y", **{"node-name": "d"}, bitmaps=[{"node": "d", "name": "q"}]
        )
        _record(out, q, "block-dirty-bitmap-enable", node="d", name="p")
        _record(out, q, "block-dirty-bitmap-disable", node="d", name="q")
        _record(out, q, "block-dirty-bitmap-clear", node="d", name="p")
        _record(out, q, "block-dirty-bitmap-add", node="d", name="fresh", persistent=True)
        _record(out, q, "block-dirty-bitmap-merge", node="d", target="fresh", bitmaps=["p"])
        _record(out, q, "block-dirty-bitmap-merge", node="d", target="p", bitmaps=["fresh"])
        _record(out, q, "block-dirty-bitmap-remove", node="d", name="q")  # removing is how to get rid of it
        _listed(out, q)
        _record(out, q, "nbd-server-stop")
        _close(q)
    out.append(("qemu-img info after removal", _qemu_img_bitmaps(image)))
    _run("qemu-img", "check", "-q", image)
    return out


def test_after_kill_9_bitmaps_come_back_inconsistent_and_are_refused(tmp_path: Path) -> None:
    out = _differential(tmp_path, _crash_scenario)
    errors = [r for r in out if isinstance(r[1], tuple) and r[1][0] == "error"]
    assert ("block-export-add", ("error", "GenericError", "Bitmap 'p' is inconsistent and cannot be used")) in errors
    final = {b["name"]: b for b in dict(out)["qemu-img info after removal"]}
    assert (
        "q" not in final
        and "lost" not in final
        and final["p"]["flags"] == ["in-use", "auto"]
        and final["fresh"]["flags"] == ["auto"]
    )


def test_serve_export_of_a_qcow2_has_its_bitmaps_and_stores_them_at_shutdown(tmp_path: Path) -> None:
    """``nbd-backup serve --export NAME=IMG,format=qcow2``: the node has the image's bitmaps, records the
    guest's writes in them, and a clean shutdown (SIGTERM) stores them (qemu-img reads the counts)."""
    require("qemu-img", "qemu-io", "nbdinfo")
    image = _qemu_image(tmp_path)
    sock = tmp_path / "nbd.sock"
    ours = start_daemon(tmp_path / "d", "--nbd-socket", str(sock), "--export", f"d={image},format=qcow2")
    try:
        with ours.connect() as q:
            listed = {b["name"]: b for b in _listed([], q)}
            assert sorted(listed) == ["gone", "q", "q-off"] and listed["q"]["persistent"]
            before = listed["q"]["count"]
            q.ok("block-dirty-bitmap-add", node="d", name="new", persistent=True, granularity=65536)
            _run("qemu-io", "-f", "raw", "-c", "write -P 9 2M 64k", f"nbd+unix:///d?socket={sock}")
            after = {b["name"]: b for b in _listed([], q)}
            assert after["q"]["count"] == before + 65536 and after["new"]["count"] == 65536
    finally:
        assert ours.stop() == 0, ours.stderr()
    stored = {b["name"]: b for b in _qemu_img_bitmaps(image)}
    assert sorted(stored) == ["gone", "new", "q", "q-off"]
    assert stored["new"]["flags"] == ["auto"] and stored["q"]["flags"] == ["auto"]
    assert _dirty(_nbdinfo_map(tmp_path, image, "new")) == [(2 << 20, 65536)]


def test_persistent_refusals_as_qemu(tmp_path: Path) -> None:
    """As qemu-storage-daemon 7.2: a v2 image cannot hold bitmaps (refused before the name is checked);
    a read-only v3 node takes a persistent bitmap (it is just never stored); bits that would take
    more than QEMU loads (512 MiB), a name over 1023 bytes and a name the image already holds are
    refused with QEMU's texts — so we never write a bitmap QEMU would refuse to load."""
    require("qemu-storage-daemon", "qemu-img", "qemu-io")

    def scenario(side: Side) -> list[Reply]:
        v2, v3 = side.work / "v2.qcow2", side.work / "v3.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, str(SIZE))
        _run("qemu-img", "create", "-q", "-f", "qcow2", v3, str(SIZE))
        out: list[Reply] = []
        with side.daemon() as q:
            _record(
                out,
                q,
                "blockdev-add",
                driver="qcow2",
                file={"driver": "file", "filename": str(v2)},
                **{"node-name": "v2"},
            )
            _record(out, q, "block-dirty-bitmap-add", node="v2", name="p", persistent=True)
            _record(out, q, "block-dirty-bitmap-add", node="v2", name="x" * 1024, persistent=True)
            _record(out, q, "block-dirty-bitmap-add", node="v2", name="t")
            _record(out, q, "block-dirty-bitmap-add", node="v2", name="t", persistent=True)  # which check first
            stored = _qemu_image(side.work)
            _record(
                out,
                q,
                "blockdev-add",
                driver="qcow2",
                file={"driver": "file", "filename": str(stored)},
                **{"node-name": "stored"},
            )
            ro = {"node-name": "ro", "read-only": True}
            _record(out, q, "blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(v3)}, **ro)
            _record(out, q, "block-dirty-bitmap-add", node="ro", name="p", persistent=True)
            _listed(out, q, "ro")
            for size, granularity in (("3T", 512), ("1100T", 65536), ("3T", 4096)):  # bits > 512 MiB: refused
                big = side.work / f"{size}.qcow2"
                if not big.exists():
                    _run("qemu-img", "create", "-q", "-f", "qcow2", big, size)
                    _record(
                        out,
                        q,
                        "blockdev-add",
                        driver="qcow2",
                        file={"driver": "file", "filename": str(big)},
                        **{"node-name": size},
                    )
                _record(out, q, "block-dirty-bitmap-add", node=size, name="g", persistent=True, granularity=granularity)
            _record(out, q, "block-dirty-bitmap-remove", node="3T", name="g")
            _record(out, q, "block-dirty-bitmap-add", node="ro", name="y" * 1024, persistent=True)
            _record(out, q, "block-dirty-bitmap-add", node="stored", name="q", persistent=True)  # on the image
            _record(out, q, "block-dirty-bitmap-add", node="stored", name="q")
            _listed(out, q, "v2")
        out.append(("qemu-img info", _qemu_img_bitmaps(v3)))
        return out

    results = []
    for kind in ("qsd", "ours"):
        (tmp_path / kind).mkdir()
        results.append(scenario(Side(kind, tmp_path / kind)))
    assert results[1] == results[0]


def test_bitmaps_of_a_read_only_qcow2_node_are_readonly_as_in_qemu(tmp_path: Path) -> None:
    """A read-only node's stored bitmaps load readonly: enabling and disabling them and merging from
    them are allowed, clearing, merging into and removing them refused with QEMU's text; the image
    is left exactly as it was."""
    require("qemu-storage-daemon", "qemu-img", "qemu-io")

    def scenario(side: Side, image: Path) -> list[Reply]:
        out: list[Reply] = []
        with side.daemon() as q:
            file = {"driver": "file", "filename": str(image)}
            _record(out, q, "blockdev-add", driver="qcow2", file=file, **{"node-name": "d", "read-only": True})
            _listed(out, q)
            _record(out, q, "block-dirty-bitmap-add", node="d", name="new")
            for verb in ("enable", "disable", "clear"):
                _record(out, q, f"block-dirty-bitmap-{verb}", node="d", name="q")
            _record(out, q, "block-dirty-bitmap-merge", node="d", target="q", bitmaps=["q-off"])
            _record(out, q, "block-dirty-bitmap-merge", node="d", target="new", bitmaps=["q"])
            _record(out, q, "block-dirty-bitmap-remove", node="d", name="gone")
            _record(out, q, "block-dirty-bitmap-remove", node="d", name="new")
            _listed(out, q)
            _record(out, q, "blockdev-del", **{"node-name": "d"})
        out.append(("qemu-img info", _qemu_img_bitmaps(image)))
        return out

    out = _differential(tmp_path, scenario)
    assert (
        "block-dirty-bitmap-clear",
        ("error", "GenericError", "Bitmap 'q' is readonly and cannot be modified"),
    ) in out
