"""``serve --state-file``: what is recorded, dropped, written (atomically) and refused, in process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from server.daemon import Daemon
from server.errors import ConfigError, QmpError
from server.state import FORMAT, VERSION, StateFile, write_atomically


def raw_image(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def run(daemon: Daemon, command: str, /, **args: Any) -> Any:
    return await daemon.commands.dispatch(daemon.registry, command, args)


def kept(path: Path) -> list[tuple[str, dict[str, Any]]]:
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    return [(entry["execute"], entry["arguments"]) for entry in doc["setup"]]


async def test_every_change_is_written_and_removals_drop_their_commands(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    image = raw_image(tmp_path / "a.raw")
    daemon = Daemon(state_file=state)
    try:
        node = {"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": str(image)}}
        await run(daemon, "blockdev-add", **node)
        assert kept(state) == [("blockdev-add", node)]
        addr = {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}
        await run(daemon, "nbd-server-start", addr=addr)
        await run(daemon, "block-export-add", type="nbd", id="e", **{"node-name": "a"})
        await run(daemon, "object-add", **{"qom-type": "authz-simple", "id": "az", "identity": "CN=x"})
        await run(daemon, "block-dirty-bitmap-add", node="a", name="b")
        assert [name for name, _ in kept(state)] == [
            "blockdev-add",
            "nbd-server-start",
            "block-export-add",
            "object-add",
        ]
        assert json.loads(state.read_text())["bitmaps"] == [
            {"node": "a", "name": "b", "persistent": False, "granularity": 65536}
        ]
        await run(daemon, "object-del", id="az")
        await run(daemon, "block-export-del", id="e")
        assert [name for name, _ in kept(state)] == ["blockdev-add", "nbd-server-start"]
        await run(daemon, "nbd-server-stop")
        await run(daemon, "blockdev-del", **{"node-name": "a"})
        assert kept(state) == []
        with pytest.raises(QmpError):  # a refused command records nothing
            await run(daemon, "blockdev-add", driver="file", filename=str(tmp_path / "missing"), **{"node-name": "m"})
        assert kept(state) == []
    finally:
        await daemon.shutdown()
    assert kept(state) == []  # shutdown closes every node but writes nothing


async def test_a_named_inline_child_outlives_its_parent(tmp_path: Path) -> None:
    """``blockdev-del`` of a format node leaves its named file node open: the file node is kept on
    as a ``blockdev-add`` of its own options (read-only inherited)."""
    state = tmp_path / "state.json"
    image = raw_image(tmp_path / "a.raw")
    daemon = Daemon(state_file=state)
    try:
        child = {"driver": "file", "filename": str(image), "node-name": "a-file"}
        await run(daemon, "blockdev-add", driver="raw", file=child, **{"node-name": "a", "read-only": True})
        await run(daemon, "blockdev-del", **{"node-name": "a"})
        assert list(daemon.registry.nodes) == ["a-file"]
        assert kept(state) == [("blockdev-add", {**child, "read-only": True})]
    finally:
        await daemon.shutdown()


async def test_restore_runs_objects_nodes_server_exports_in_that_order(tmp_path: Path) -> None:
    """A file whose entries are out of order (an export before its node) still comes up whole."""
    state = tmp_path / "state.json"
    image = raw_image(tmp_path / "a.raw")
    setup = [
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "a"}},
        {
            "execute": "nbd-server-start",
            "arguments": {"addr": {"type": "unix", "data": {"path": str(tmp_path / "s")}}, "tls-authz": "az"},
        },
        {"execute": "blockdev-add", "arguments": {"driver": "file", "filename": str(image), "node-name": "a"}},
        {"execute": "object-add", "arguments": {"qom-type": "authz-simple", "id": "az", "identity": "CN=x"}},
    ]
    state.write_text(json.dumps({"format": FORMAT, "version": VERSION, "setup": setup}))
    daemon = Daemon(state_file=state)
    try:
        failed = await daemon.restore_state()
        # tls-authz without tls-creds is refused (as the QMP command is): the server and its export fail
        assert [f.split()[0] for f in failed] == ["nbd-server-start", "block-export-add"]
        assert list(daemon.registry.nodes) == ["a"] and "az" in daemon.registry.objects.objects
        assert (tmp_path / "state.json.unrestored").read_text() == json.dumps(
            {"format": FORMAT, "version": VERSION, "setup": setup}
        )
        assert [name for name, _ in kept(state)] == ["object-add", "blockdev-add"]
    finally:
        await daemon.shutdown()


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not JSON"),
        ('{"format": "something-else", "version": 1, "setup": []}', "not an nbd-backup state file"),
        (json.dumps({"format": FORMAT, "version": 99, "setup": []}), "version 99"),
        (json.dumps({"format": FORMAT, "version": VERSION, "setup": [{"execute": "quit"}]}), "setup entry 0"),
        (
            json.dumps({"format": FORMAT, "version": VERSION, "setup": [{"execute": "blockdev-add", "arguments": {}}]}),
            "lacks 'node-name'",
        ),
    ],
)
def test_a_corrupt_state_file_stops_the_start_and_stays_as_it_is(tmp_path: Path, text: str, why: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Daemon(state_file=state)
    assert str(state) in str(caught.value) and why in str(caught.value)
    assert "move it aside" in str(caught.value)
    assert state.read_text() == text


def test_no_state_file_yet_is_a_first_start_but_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    StateFile(tmp_path / "state.json").load()
    with pytest.raises(ConfigError, match="does not exist"):
        StateFile(tmp_path / "nowhere" / "state.json").load()


@pytest.mark.parametrize("crash_in", ["write", "fsync", "replace"])
def test_a_crash_mid_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_in: str) -> None:
    """Whatever step the writer dies in (simulated by an exception there), the file holds the old
    state in full and no temporary file is left behind."""
    path = tmp_path / "state.json"
    write_atomically(path, "old\n")

    class Crash(BaseException):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    if crash_in == "write":
        real_open = open

        def half_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            stream = real_open(file, *args, **kwargs)
            stream.write("ne")  # part of the new text reached the temporary file
            stream.flush()
            monkeypatch.setattr(stream, "write", crash)
            return stream

        monkeypatch.setattr("builtins.open", half_open)
    else:
        monkeypatch.setattr(os, crash_in, crash)
    with pytest.raises(Crash):
        write_atomically(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["state.json"]


async def test_an_opened_snapshot_is_kept_a_begun_one_never(tmp_path: Path) -> None:
    """``repo-snapshot-open`` (read-only) comes back after a restart; a writable ``repo-snapshot-begin``
    is not kept (it is dropped uncommitted at the stop), and neither is anything built on it."""
    from backup.repo.repository import Repository

    state = tmp_path / "state.json"
    chunk = 64 << 10

    async def daemon_with_repo() -> Daemon:
        daemon = Daemon(state_file=state)
        daemon.registry.repos["default"] = Repository.open(tmp_path / "repo")
        return daemon

    Repository.init(tmp_path / "repo", chunk)
    first = await daemon_with_repo()
    try:
        await run(first, "repo-snapshot-begin", disk="d", size=chunk, parent="none", **{"node-name": "w"})
        await first.registry.node("w").pwrite(0, b"x" * chunk)
        await run(first, "repo-snapshot-commit", **{"node-name": "w"})
        await run(first, "repo-snapshot-open", disk="d", **{"node-name": "old"})
        await run(first, "repo-snapshot-begin", disk="d", size=chunk, **{"node-name": "w2"})
        assert [name for name, _ in kept(state)] == ["repo-snapshot-open"]
    finally:
        await first.shutdown()
    second = await daemon_with_repo()
    try:
        assert await second.restore_state() == []
        assert list(second.registry.nodes) == ["old"]
        assert await second.registry.node("old").pread(0, 4) == b"xxxx"
    finally:
        await second.shutdown()
