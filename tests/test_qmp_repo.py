"""The repository's QMP commands in-process (design §3.6): schema validation, refusals with QEMU's
classes and texts in its style, begin → write → commit, abort on ``blockdev-del`` and at shutdown,
one writable snapshot per disk, read-only opened snapshots, ``--repo-exports``' resolver, and the
argument parsing of ``serve --repo`` and ``backup ... repo:``."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from backup.repo.repository import Repository
from server.commands import serve
from server.config import load_config
from server.errors import ConfigError
from server.paths import PathPolicy
from server.repo_backup import RepoTarget, backup_commands, parse_repo_target
from server.repos import RepoExports, open_repos, parse_repo
from tests.test_qmp_commands import Harness

CS = 64 << 10
KiB = 1 << 10
OLD = "20261207T101112.000000Z"


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    harness.reg.repos["default"] = Repository.init(tmp_path / "repo", CS)
    yield harness
    await harness.reg.close()


def node_args(name: str, **more: Any) -> dict[str, Any]:
    return {"node-name": name, **more}


async def read_node(h: Harness, name: str) -> bytes:
    node = h.reg.node(name)
    return await node.pread(0, node.size)


async def test_commands_are_listed_and_validated(h: Harness) -> None:
    names = set(h.commands.names())
    assert {"repo-snapshot-begin", "repo-snapshot-commit", "repo-snapshot-abort", "repo-snapshot-open"} <= names
    assert "query-repo-snapshots" in names
    assert await h.error("repo-snapshot-begin", size=CS, **node_args("s")) == (
        "GenericError",
        "Parameter 'disk' is missing",
    )
    assert (await h.error("repo-snapshot-begin", disk="d", size="1M", **node_args("s")))[1] == (
        "Parameter 'size' expects uint64"
    )
    assert (await h.error("repo-snapshot-begin", disk="d", size=CS, **node_args("s"), bogus=1))[1] == (
        "Parameter 'bogus' is unexpected"
    )
    assert (await h.error("repo-snapshot-commit"))[1] == "Parameter 'node-name' is missing"
    assert (await h.error("query-repo-snapshots", disk=3))[1] == "Invalid parameter type for 'disk', expected: string"


async def test_repo_selection(h: Harness, tmp_path: Path) -> None:
    assert (await h.error("query-repo-snapshots", repo="nope"))[1] == "Repository 'nope' not found"
    assert (await h.error("repo-snapshot-begin", repo="nope", disk="d", size=CS, **node_args("s")))[1] == (
        "Repository 'nope' not found"
    )
    h.reg.repos["two"] = Repository.init(tmp_path / "repo2", CS)
    assert (await h.error("repo-snapshot-begin", disk="d", size=CS, **node_args("s")))[1] == (
        "Parameter 'repo' is missing (open repositories: default, two)"
    )
    assert (await h.error("query-repo-snapshots"))[1] == "Parameter 'repo' is missing (open repositories: default, two)"
    await h("repo-snapshot-begin", repo="two", disk="d", size=CS, **node_args("s"))
    await h("repo-snapshot-begin", repo="default", disk="d", size=CS, **node_args("t"))  # another repository
    assert (await h("repo-snapshot-commit", **node_args("s")))["disk"] == "d"
    assert [s["disk"] for s in await h("query-repo-snapshots", repo="two")] == ["d"]
    assert await h("query-repo-snapshots", repo="default") == []
    h.reg.repos.clear()
    assert (await h.error("query-repo-snapshots"))[1] == "No repository is open (start the daemon with --repo DIR)"


@pytest.mark.parametrize("disk", ["", "a//b", ".hidden", "a/../b", "a b", "x@y", "a:b", "/a", "a/", "/".join("a" * 9)])
async def test_bad_disk_names(h: Harness, disk: str) -> None:
    desc = (await h.error("repo-snapshot-begin", disk=disk, size=CS, **node_args("s")))[1]
    assert desc.startswith(f"Invalid disk name '{disk}': ")
    assert (await h.error("repo-snapshot-open", disk=disk, **node_args("s")))[1] == desc
    assert (await h.error("query-repo-snapshots", disk=disk))[1] == desc
    assert "s" not in h.reg.nodes


async def test_bad_arguments_change_nothing(h: Harness) -> None:
    for args, desc in [
        ({"parent": "yesterday"}, "Parameter 'parent' expects 'latest', 'none' or a snapshot id"),
        ({"parent": OLD}, f"Snapshot 'd@{OLD}' not found in repository 'default'"),
        ({"size": 0}, "Parameter 'size' expects a positive number of bytes"),
        ({"node-name": "0bad"}, "Invalid node-name: '0bad'"),
    ]:
        base = {"disk": "d", "size": CS, "node-name": "s"}
        assert (await h.error("repo-snapshot-begin", **(base | args)))[1] == desc
    assert (await h.error("repo-snapshot-open", disk="d", snapshot="none", **node_args("o")))[1] == (
        "Parameter 'snapshot' expects 'latest' or a snapshot id"
    )
    assert (await h.error("repo-snapshot-open", disk="d", **node_args("o")))[1] == (
        "Snapshot 'd@latest' not found in repository 'default'"
    )
    assert h.reg.nodes == {}
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))  # the disk was never left locked


async def test_begin_write_commit_and_open(h: Harness) -> None:
    size = 3 * CS + 5 * KiB
    await h("repo-snapshot-begin", disk="vm1/disk0", size=size, parent="none", **node_args("s"))
    [info] = [n for n in await h("query-named-block-nodes") if n["node-name"] == "s"]
    assert info["drv"] == "repo-snapshot" and info["ro"] is False and info["image"]["virtual-size"] == size
    node = h.reg.node("s")
    first = os.urandom(size)
    await node.pwrite(0, first)
    reply = await h("repo-snapshot-commit", **node_args("s"))
    assert set(reply) == {"disk", "snapshot", "size", "new-bytes"}
    assert reply["disk"] == "vm1/disk0" and reply["size"] == size and reply["new-bytes"] == size
    assert "s" not in h.reg.nodes
    [listed] = await h("query-repo-snapshots", disk="vm1/disk0")
    assert listed == {
        "disk": "vm1/disk0",
        "id": reply["snapshot"],
        "created": listed["created"],
        "size": size,
        "parent": None,
        "new-bytes": size,
    }
    # the next snapshot starts as its parent: a partial write merges with it
    await h("repo-snapshot-begin", disk="vm1/disk0", size=size, **node_args("s2"))
    assert await read_node(h, "s2") == first
    await h.reg.node("s2").pwrite(CS + 100, b"x" * 300)
    second = await h("repo-snapshot-commit", **node_args("s2"))
    assert second["new-bytes"] == CS  # one chunk changed
    expected = bytearray(first)
    expected[CS + 100 : CS + 400] = b"x" * 300
    await h("repo-snapshot-open", disk="vm1/disk0", **node_args("latest"))
    await h("repo-snapshot-open", disk="vm1/disk0", snapshot=reply["snapshot"], **node_args("old"))
    assert await read_node(h, "latest") == expected
    assert await read_node(h, "old") == first
    assert h.reg.node("old").read_only
    listed2 = await h("query-repo-snapshots")
    assert [s["id"] for s in listed2] == [reply["snapshot"], second["snapshot"]]
    assert listed2[1]["parent"] == reply["snapshot"]
    # an opened snapshot is not a writable one: no commit, no abort, no writable export
    assert (await h.error("repo-snapshot-commit", **node_args("old")))[1] == (
        "Node 'old' is not an uncommitted repository snapshot"
    )
    assert (await h.error("repo-snapshot-abort", **node_args("old")))[1] == (
        "Node 'old' is not an uncommitted repository snapshot"
    )
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(h.tmp / "nbd.sock")}})
    assert (await h.error("block-export-add", type="nbd", id="e", writable=True, **node_args("old")))[1] == (
        "Cannot export read-only node as writable"
    )
    await h("block-export-add", type="nbd", id="e", **node_args("old"))
    await h("blockdev-del", **node_args("latest"))
    assert (await h.error("repo-snapshot-commit", **node_args("nope")))[1] == (
        "Cannot find device='nope' nor node-name='nope'"
    )


async def test_one_writable_snapshot_per_disk(h: Harness) -> None:
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))
    assert (await h.error("repo-snapshot-begin", disk="d", size=CS, **node_args("t")))[1] == (
        "Disk 'd' of repository 'default' already has an uncommitted snapshot: 's'"
    )
    # another process (the CLI) holds the disk: the repository's lock says so
    other = h.reg.repos["default"].begin_write("e")
    try:
        assert (await h.error("repo-snapshot-begin", disk="e", size=CS, **node_args("t")))[1] == (
            "Disk 'e' of repository 'default' is busy: another backup or prune is writing it"
        )
    finally:
        other.abort()
    await h("repo-snapshot-begin", disk="e", size=CS, **node_args("t"))
    await h("repo-snapshot-abort", **node_args("s"))
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))  # free again


async def test_commit_and_abort_refused_while_exported(h: Harness) -> None:
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(h.tmp / "nbd.sock")}})
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))
    await h("block-export-add", type="nbd", id="e", writable=True, **node_args("s"))
    for verb in ("repo-snapshot-commit", "repo-snapshot-abort"):
        assert await h.error(verb, **node_args("s")) == ("GenericError", "Node 's' is in use by NBD export 's'")
    await h("block-export-del", id="e")
    await h("repo-snapshot-commit", **node_args("s"))
    assert len(await h("query-repo-snapshots")) == 1


async def test_commit_and_abort_refused_while_a_job_runs(h: Harness) -> None:
    src = h.image("src.raw", 4 * CS, fill=0x33)
    await h("blockdev-add", driver="file", filename=str(src), **node_args("src"))
    await h("repo-snapshot-begin", disk="d", size=4 * CS, parent="none", **node_args("s"))
    await h("blockdev-backup", **{"job-id": "j"}, device="src", target="s", sync="full", speed=1)
    for verb in ("repo-snapshot-commit", "repo-snapshot-abort"):
        assert await h.error(verb, **node_args("s")) == (
            "GenericError",
            "Node 's' is busy: block device is in use by block job: backup",
        )
    assert (await h.error("blockdev-del", **node_args("s")))[1].startswith("Node 's' is busy")
    await h("block-job-cancel", device="j", force=True)
    await h.wait_gone("j")
    await h("repo-snapshot-abort", **node_args("s"))
    assert await h("query-repo-snapshots") == []


async def test_backup_jobs_full_then_incremental(h: Harness) -> None:
    size = 4 * CS
    src = h.image("src.raw", size, fill=0)
    await h("blockdev-add", driver="file", filename=str(src), **node_args("src"))
    source = h.reg.node("src")
    await source.pwrite(0, os.urandom(size))
    before = await source.pread(0, size)
    await h("repo-snapshot-begin", disk="d", size=size, parent="none", **node_args("s"))
    add = {"node": "src", "name": "b"}
    full = {"job-id": "j", "device": "src", "target": "s", "sync": "full"}
    await h(
        "transaction",
        actions=[{"type": "block-dirty-bitmap-add", "data": add}, {"type": "blockdev-backup", "data": full}],
    )
    await h.wait_gone("j")
    first = await h("repo-snapshot-commit", **node_args("s"))
    await source.pwrite(2 * CS + 7, b"changed")
    after = await source.pread(0, size)
    await h("repo-snapshot-begin", disk="d", size=size, **node_args("s"))
    await h("blockdev-backup", **{"job-id": "j"}, device="src", target="s", sync="incremental", bitmap="b")
    await h.wait_gone("j")
    second = await h("repo-snapshot-commit", **node_args("s"))
    assert second["new-bytes"] == CS
    for snap, expected in ((first, before), (second, after)):
        await h("repo-snapshot-open", disk="d", snapshot=snap["snapshot"], **node_args("o"))
        assert await read_node(h, "o") == expected
        await h("blockdev-del", **node_args("o"))


async def test_blockdev_del_and_shutdown_abort(h: Harness) -> None:
    repo = h.reg.repos["default"]
    await h("repo-snapshot-begin", disk="d", size=2 * CS, **node_args("s"))
    await h.reg.node("s").pwrite(0, os.urandom(2 * CS))
    await h("blockdev-del", **node_args("s"))
    assert repo.snapshot_ids("d") == []
    await h("repo-snapshot-begin", disk="d", size=2 * CS, **node_args("s"))  # the lock went with it
    await h.reg.node("s").pwrite(0, os.urandom(2 * CS))
    await h("repo-snapshot-begin", disk="e", size=2 * CS, **node_args("t"))
    await h.reg.close()
    assert h.reg.shutdown_errors == []
    assert repo.snapshot_ids("d") == [] and repo.snapshot_ids("e") == []
    with repo.begin_write("d"):  # nothing holds the disks any more
        pass


async def test_repo_exports_resolve_and_follow_latest(h: Harness, tmp_path: Path) -> None:
    repos = h.reg.repos
    exports = RepoExports(repos)
    assert exports.lookup("d@latest") is None and list(exports.entries()) == []
    ids = []
    for fill in (b"1", b"2"):
        await h("repo-snapshot-begin", disk="vm/d", size=CS, **node_args("s"))
        await h.reg.node("s").pwrite(0, fill * CS)
        ids.append((await h("repo-snapshot-commit", **node_args("s")))["snapshot"])
        latest = exports.lookup("vm/d@latest")
        assert latest is not None and latest.read_only and await latest.device.pread(0, 1) == fill
    assert [e.name for e in exports.entries()] == [f"vm/d@{ids[0]}", f"vm/d@{ids[1]}", "vm/d@latest"]
    first = exports.lookup(f"vm/d@{ids[0]}")
    assert first is not None and await first.device.pread(0, CS) == b"1" * CS
    assert exports.lookup(f"default:vm/d@{ids[1]}") is not None
    for missing in ("vm/d", "vm/d@20200101T000000.000000Z", "nope:vm/d@latest", "bad name@latest", "x@latest"):
        assert exports.lookup(missing) is None
    repos["two"] = Repository.init(tmp_path / "repo2", CS)
    assert all(not e.name.startswith("two:") for e in exports.entries())
    assert exports.lookup(f"vm/d@{ids[0]}") is not None  # still the default repository's


def test_parse_repo_and_open(tmp_path: Path) -> None:
    assert parse_repo("/srv/repo") == serve.RepoSpec("default", "/srv/repo")
    assert parse_repo("off-site=/mnt/r") == serve.RepoSpec("off-site", "/mnt/r")
    assert parse_repo("./a=b") == serve.RepoSpec("default", "./a=b")
    with pytest.raises(ConfigError):
        parse_repo("x=")
    Repository.init(tmp_path / "allowed" / "r", CS)
    specs = [parse_repo(str(tmp_path / "allowed" / "r"))]
    assert list(open_repos(specs, PathPolicy([tmp_path / "allowed" / "r"]))) == ["default"]  # the allowed dir itself
    with pytest.raises(ConfigError, match="outside the allowed directories"):
        open_repos(specs, PathPolicy([tmp_path / "elsewhere"]))
    with pytest.raises(ConfigError, match="is not a repository"):
        open_repos([parse_repo(str(tmp_path))], PathPolicy())
    with pytest.raises(ConfigError, match="given twice"):
        open_repos(specs * 2, PathPolicy())


def test_serve_options_and_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repo", "/r1", "--repo", "b=/r2", "--repo-exports"])
    config = serve.config_from_args(args)
    assert [(r.id, r.path) for r in config.repos] == [("default", "/r1"), ("b", "/r2")]
    assert config.repo_exports and config.tcp == [("127.0.0.1", 10809)]
    with pytest.raises(ConfigError, match="needs at least one --repo"):
        serve.config_from_args(parser.parse_args(["serve", "--repo-exports"]))
    toml = tmp_path / "serve.toml"
    toml.write_text('repo = ["repo", "off=../other"]\nrepo-exports = true\n')
    assert load_config(toml) == {"repo": [str(tmp_path / "repo"), f"off={tmp_path}/../other"], "repo_exports": True}
    config = serve.config_from_args(parser.parse_args(["serve", "--config", str(toml), "--repo", "c=/r3"]))
    assert [r.id for r in config.repos] == ["default", "off", "c"] and config.repo_exports


def test_backup_target_and_commands() -> None:
    assert parse_repo_target("/backups/x.raw") is None
    assert parse_repo_target("repo:vm1/disk0") == RepoTarget(None, "vm1/disk0")
    assert parse_repo_target("repo:off:vm1/disk0") == RepoTarget("off", "vm1/disk0")
    for bad in ("repo:", "repo::d", "repo:a/../b"):
        with pytest.raises(ConfigError):
            parse_repo_target(bad)
    common = {"device": "d0", "node": "n", "job_id": "j"}
    plain = backup_commands(**common, bitmap=None, incremental=False, has_bitmap=False, qcow2=False)
    assert plain == ("blockdev-backup", {"job-id": "j", "device": "d0", "target": "n", "sync": "full"})
    incremental = backup_commands(**common, bitmap="b", incremental=True, has_bitmap=True, qcow2=True)
    assert incremental[1]["sync"] == "incremental" and incremental[1]["bitmap"] == "b"
    restart = backup_commands(**common, bitmap="b", incremental=False, has_bitmap=True, qcow2=True)
    assert restart[1] | {} == {**plain[1], "bitmap": "b", "bitmap-mode": "on-success"}
    name, args = backup_commands(**common, bitmap="b", incremental=False, has_bitmap=False, qcow2=True)
    assert name == "transaction"
    assert args["actions"][0] == {
        "type": "block-dirty-bitmap-add",
        "data": {"node": "d0", "name": "b", "persistent": True},
    }


async def test_daemon_opens_repositories(tmp_path: Path) -> None:
    """``build_daemon`` opens every ``--repo`` under the path policy; the ready line names them."""
    Repository.init(tmp_path / "r", CS)
    config = serve.ServeConfig(
        repos=[parse_repo(f"main={tmp_path / 'r'}")], repo_exports=True, unix=[str(tmp_path / "s")]
    )
    daemon = await serve.build_daemon(config)
    try:
        assert list(daemon.registry.repos) == ["main"]
        assert f"repos=main:{tmp_path / 'r'}" in daemon.ready_line()
        assert daemon.nbd is not None and isinstance(daemon.nbd.resolver, RepoExports)
    finally:
        await daemon.shutdown()
    with pytest.raises(ConfigError, match="is not a repository"):
        await serve.build_daemon(serve.ServeConfig(repos=[parse_repo(str(tmp_path))]))


async def test_failed_commit_publishes_nothing(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that cannot store its chunks (ENOSPC) is an error, ends the snapshot and its node, and
    leaves the disk free for the next one."""
    repo = h.reg.repos["default"]
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))
    await h.reg.node("s").pwrite(0, os.urandom(CS))

    def full(digest: str, blob: bytes) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(repo.chunks, "put", full)
    desc = (await h.error("repo-snapshot-commit", **node_args("s")))[1]
    assert desc.startswith("Could not commit the snapshot of disk 'd': ") and "No space left" in desc
    assert desc.endswith("nothing was published")
    assert "s" not in h.reg.nodes and repo.snapshot_ids("d") == []
    monkeypatch.undo()
    await h("repo-snapshot-begin", disk="d", size=CS, **node_args("s"))


def test_open_repos_takes_a_bucket_whatever_the_allowed_directories(s3_server: Any, tmp_path: Path) -> None:
    """``serve --repo s3://…``: ``--allow-dir`` confines files, and a bucket is not one — it opens (it
    used to be resolved as a relative path and refused as outside the allowed directories)."""
    from repokit import S3Where

    where = S3Where(s3_server.endpoint, s3_server.new_bucket())
    Repository.init(where.loc(), CS)
    repos = open_repos([parse_repo(where.loc())], PathPolicy([tmp_path / "only-here"]))
    assert list(repos) == ["default"] and repos["default"].chunk_size == CS
