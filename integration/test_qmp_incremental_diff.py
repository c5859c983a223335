"""Differential tests of incremental backups: ``sync: incremental`` / ``bitmap`` / ``full`` with a
``bitmap`` and each ``bitmap-mode``, on success, failure and cancel, against qemu-storage-daemon 7.2
(``test_qmp_diff``'s harness): the same replies, error classes and texts, job events, and every named
node's ``dirty-bitmaps`` (counts included) after each step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require
from qmp_daemon import make_image
from test_qmp_bitmaps_diff import GUEST_WRITES, bitmaps, guest_writes
from test_qmp_diff import SIZE, SLOW, Run, differential, failing_nbdkit, target


def qemu_io(sock: Path, *commands: str) -> None:
    """qemu-io writing through the export ``src`` on ``sock`` (a guest)."""
    argv = ["qemu-io", "-f", "raw", f"nbd+unix:///src?socket={sock}"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done


def test_argument_checks(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("block-dirty-bitmap-add", node="src", name="b")
        t = target(run, "t.raw")
        run("drive-backup", device="src", target=t, sync="incremental")
        run("drive-backup", device="src", target=t, sync="bitmap")
        run("drive-backup", device="src", target=t, sync="incremental", bitmap="b", **{"bitmap-mode": "never"})
        run("drive-backup", device="src", target=t, sync="incremental", bitmap="b", **{"bitmap-mode": "always"})
        run("drive-backup", device="src", target=t, sync="incremental", bitmap="nope")
        run("drive-backup", device="src", target=t, sync="bitmap", bitmap="b")
        run("drive-backup", device="src", target=t, sync="full", bitmap="b")
        run("drive-backup", device="src", target=t, sync="none", bitmap="b", **{"bitmap-mode": "on-success"})
        run("drive-backup", device="src", target=t, sync="full", bitmap="b", **{"bitmap-mode": "never"})
        run("drive-backup", device="src", target=t, sync="top", bitmap="b", **{"bitmap-mode": "never"})
        run("drive-backup", device="src", target=t, sync="full", **{"bitmap-mode": "always"})
        run("drive-backup", device="src", target=t, sync="bitmap", bitmap="b", **{"bitmap-mode": "sometimes"})
        run("blockdev-backup", device="src", target="src-file", sync="incremental")
        run("blockdev-backup", device="src", target="src-file", sync="bitmap", bitmap="x", **{"bitmap-mode": "never"})
        bitmaps(run)
        # two backups from one bitmap in one transaction: the second finds it busy, the first is undone
        first = {"job-id": "t1", "device": "src", "target": target(run, "t1.raw"), "sync": "incremental", "bitmap": "b"}
        second = {**first, "job-id": "t2", "target": target(run, "t2.raw")}
        run("transaction", actions=[_act("drive-backup", **first), _act("drive-backup", **second)])
        bitmaps(run)
        return []

    differential(tmp_path, scenario)


@pytest.mark.parametrize(
    ("sync", "mode"),
    [("incremental", None), ("bitmap", "on-success"), ("bitmap", "never"), ("bitmap", "always"), ("full", "always")],
)
def test_bitmap_after_a_successful_backup(tmp_path: Path, sync: str, mode: str | None) -> None:
    """Success: ``on-success``/``always`` keep only what was written since the backup began, ``never``
    keeps the bitmap as it was."""
    require("qemu-io")

    def scenario(run: Run) -> list[str]:
        run("block-dirty-bitmap-add", node="src", name="b")
        run("block-dirty-bitmap-add", node="src", name="other", granularity=4096)
        guest_writes(run, *GUEST_WRITES)
        bitmaps(run)
        extra = {} if mode is None else {"bitmap-mode": mode}
        extra["job-id"] = "j"
        run("drive-backup", device="src", target=target(run, "t.raw"), sync=sync, bitmap="b", **extra)
        run.wait_gone("j")
        bitmaps(run)
        return ["j"]

    differential(tmp_path, scenario)


@pytest.mark.parametrize("granularity", [512, 4096, 1 << 20])
def test_blockdev_backup_incremental_at_any_granularity(tmp_path: Path, granularity: int) -> None:
    """``blockdev-backup`` to a node with bitmaps finer and coarser than the backup's cluster (both
    accepted by QEMU 7.2: whole dirty granules are copied, the bitmap is cleared on success)."""
    require("qemu-io")

    def scenario(run: Run) -> list[str]:
        image = make_image(run.work / "t.raw", SIZE, pattern=0)
        run.q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "tgt"})
        run("block-dirty-bitmap-add", node="src", name="b", granularity=granularity)
        guest_writes(run, *GUEST_WRITES)
        bitmaps(run)
        run("blockdev-backup", device="src", target="tgt", sync="incremental", bitmap="b", **{"job-id": "j"})
        run.wait_gone("j")
        bitmaps(run)
        return ["j"]

    differential(tmp_path, scenario)


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_busy_while_running_and_cancel(tmp_path: Path, mode: str) -> None:
    """While the job runs the bitmap is busy (every change refused, a second backup from it too) and
    still records into its successor; a cancel is a failure: ``on-success`` and ``never`` merge the
    new writes back into the old bits, ``always`` keeps what was not copied plus the new writes."""
    require("qemu-io")

    def scenario(run: Run) -> list[str]:
        run("block-dirty-bitmap-add", node="src", name="b")
        sock = run.work / "nbd.sock"  # exported before the job: qsd refuses a new export of a node under one
        run("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        run("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "src"})
        qemu_io(sock, "write -P 1 0 4096", "write -P 2 3000000 70000")
        # One worker at 64 KiB/s: each daemon copies the first dirty granule, then waits a second.
        args = {"job-id": "j", "bitmap-mode": mode, "speed": SLOW, "x-perf": {"max-workers": 1}}
        run("drive-backup", device="src", target=target(run, "t.raw"), sync="bitmap", bitmap="b", **args)
        bitmaps(run)
        run("block-dirty-bitmap-clear", node="src", name="b")
        run("block-dirty-bitmap-disable", node="src", name="b")
        run("block-dirty-bitmap-enable", node="src", name="b")
        run("block-dirty-bitmap-remove", node="src", name="b")
        run("block-dirty-bitmap-add", node="src", name="m")
        run("block-dirty-bitmap-merge", node="src", target="b", bitmaps=["m"])
        run("block-dirty-bitmap-merge", node="src", target="m", bitmaps=["b"])  # a busy source is refused too
        second = {"job-id": "k", "target": target(run, "u.raw")}
        run("drive-backup", device="src", sync="incremental", bitmap="b", **second)
        qemu_io(sock, "write -P 3 1048576 4096")
        bitmaps(run)
        run("block-job-cancel", device="j")
        run.wait_gone("j")
        bitmaps(run)
        return ["j"]

    differential(tmp_path, scenario)


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_bitmap_after_a_failed_backup(tmp_path: Path, mode: str) -> None:
    """A target whose writes fail (nbdkit's error filter): the job fails, and the bitmap follows the
    mode's failure rule (nothing was copied, so every mode keeps the old bits)."""
    require("qemu-io", "nbdkit")

    def scenario(run: Run) -> list[str]:
        run("block-dirty-bitmap-add", node="src", name="b")
        guest_writes(run, *GUEST_WRITES)
        with failing_nbdkit(run, "target", "pwrite", run.work / "fault", "EIO", "memory", str(SIZE)) as sock:
            run(
                "drive-backup",
                **{"job-id": "j", "bitmap-mode": mode},
                device="src",
                target=f"nbd+unix:///?socket={sock}",
                sync="bitmap",
                bitmap="b",
                format="raw",
                mode="existing",
            )
            run.wait_gone("j")
        bitmaps(run)
        return ["j"]

    differential(tmp_path, scenario)


def _act(kind: str, **data: object) -> dict[str, object]:
    return {"type": kind, "data": data}


def test_transaction_full_backup_and_a_new_bitmap_then_an_incremental(tmp_path: Path) -> None:
    """The recipe: a full backup and a new bitmap at one instant, writes, an incremental from it."""
    require("qemu-io")

    def scenario(run: Run) -> list[str]:
        guest_writes(run, "write -P 7 0 1048576")
        full = {"job-id": "full", "device": "src", "target": target(run, "full.raw"), "sync": "full"}
        run(
            "transaction",
            actions=[_act("drive-backup", **full), _act("block-dirty-bitmap-add", node="src", name="b")],
        )
        run.wait_gone("full")
        bitmaps(run)  # the full backup's writes went to the target, not the source: b is clean
        guest_writes(run, *GUEST_WRITES)
        bitmaps(run)
        inc = {"job-id": "inc", "device": "src", "target": target(run, "inc.raw"), "sync": "incremental"}
        run(
            "transaction",
            actions=[_act("block-dirty-bitmap-add", node="src", name="c"), _act("drive-backup", **inc, bitmap="b")],
        )
        run.wait_gone("inc")
        bitmaps(run)
        return ["full", "inc"]

    differential(tmp_path, scenario)


def test_bitmap_actions_all_or_nothing(tmp_path: Path) -> None:
    """Every bitmap action undone when a later action fails; committed together otherwise; a bitmap
    removed earlier in the transaction is busy for the later actions; ``grouped`` refused."""
    require("qemu-io")

    def scenario(run: Run) -> list[str]:
        run("block-dirty-bitmap-add", node="src", name="a", granularity=4096)
        run("block-dirty-bitmap-add", node="src", name="b", disabled=True)
        run("block-dirty-bitmap-add", node="src", name="gone")
        guest_writes(run, *GUEST_WRITES)
        changes = [
            _act("block-dirty-bitmap-add", node="src", name="new", granularity=512),
            _act("block-dirty-bitmap-merge", node="src", target="b", bitmaps=["a"]),
            _act("block-dirty-bitmap-clear", node="src", name="a"),
            _act("block-dirty-bitmap-enable", node="src", name="b"),
            _act("block-dirty-bitmap-disable", node="src", name="gone"),
            _act("block-dirty-bitmap-remove", node="src", name="gone"),
        ]
        run("transaction", actions=[*changes, _act("abort")])
        bitmaps(run)
        run("transaction", actions=[*changes, _act("block-dirty-bitmap-clear", node="src", name="gone")])
        run("transaction", actions=[*changes, _act("block-dirty-bitmap-add", node="nope", name="x")])
        bitmaps(run)
        run("transaction", actions=changes, properties={"completion-mode": "grouped"})
        run("transaction", actions=[*changes, _act("block-dirty-bitmap-clear", node="src", name="new")])
        bitmaps(run)
        t = target(run, "t.raw")
        run(
            "transaction",
            actions=[
                _act("block-dirty-bitmap-remove", node="src", name="a"),
                _act("drive-backup", **{"job-id": "j"}, device="src", target=t, sync="incremental", bitmap="a"),
            ],
        )
        bitmaps(run)
        return []

    differential(tmp_path, scenario)
