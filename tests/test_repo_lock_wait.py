"""A writer of a disk waits a little for another writer's hold before it says the disk is busy.

A prune holds a disk for milliseconds: a backup started meanwhile from the command line waits for it
(``Repository.lock_wait``) instead of failing; the daemon's writers (``lock_wait`` 0) answer busy at
once, and a hold that outlasts the wait is still busy. On both backends.
"""

from __future__ import annotations

import threading

import pytest
from repokit import Where, new_repo, rand_chunk, write_snapshot

from backup.repo.errors import DiskBusy
from backup.repo.prune import PruneRules, prune


def test_without_a_wait_a_held_disk_is_busy_at_once(where: Where) -> None:
    repo = new_repo(where)
    held = repo.hold_disk("d")
    try:
        with pytest.raises(DiskBusy):
            repo.begin_write("d")
    finally:
        held.release()


def test_a_backup_waits_for_a_short_hold_and_a_long_one_is_still_busy(where: Where) -> None:
    repo = new_repo(where)
    repo.lock_wait = 10.0
    held = repo.hold_disk("d")
    released = threading.Event()

    def release_soon() -> None:
        released.wait(0.2)
        held.release()

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    try:
        m = write_snapshot(repo, "d", [rand_chunk()])  # waits for the hold, then writes
    finally:
        released.set()
        releaser.join()
    assert repo.snapshot_ids("d") == [m.id]
    repo.lock_wait = 0.1
    held = repo.hold_disk("d")
    try:
        with pytest.raises(DiskBusy):
            repo.begin_write("d")
        with pytest.raises(DiskBusy):
            prune(repo, "d", PruneRules(keep_last=1))
    finally:
        held.release()
