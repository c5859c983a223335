"""Helpers of the repository tests: a small repository, snapshots written into it, and the backends."""

from __future__ import annotations

import os
import time
from pathlib import Path

from backup.repo.manifest import Manifest
from backup.repo.repository import Repository

CS = 64 << 10


class Where:
    """A backend for the repository tests: names repositories, and tampers with them behind the API."""

    local = True

    def loc(self, name: str = "repo") -> str:
        raise NotImplementedError

    def tick(self) -> None:
        """Let the store's clock move on (S3 times have whole seconds: "older than" needs one to pass)."""

    def put_raw(self, repo_loc: str, name: str, data: bytes) -> None:
        raise NotImplementedError

    def get_raw(self, repo: Repository, name: str) -> bytes:
        raise NotImplementedError

    def chunk_name(self, digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def manifest_name(self, disk: str, snap_id: str) -> str:
        return f"disks/{disk}/@snapshots/{snap_id}.json"

    def leftovers(self, repo: Repository) -> list[str]:
        """Leases and temporaries left behind (none once every writer finished)."""
        raise NotImplementedError

    def every_object(self, repo: Repository) -> dict[str, bytes]:
        """Every file or object of the repository, by name, with its bytes (what the store holds)."""
        raise NotImplementedError


class LocalWhere(Where):
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path

    def loc(self, name: str = "repo") -> str:
        return str(self.root / name)

    def put_raw(self, repo_loc: str, name: str, data: bytes) -> None:
        path = Path(repo_loc) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def get_raw(self, repo: Repository, name: str) -> bytes:
        return (repo.path / name).read_bytes()

    def leftovers(self, repo: Repository) -> list[str]:
        return os.listdir(repo.path / "leases") + os.listdir(repo.path / "tmp")

    def every_object(self, repo: Repository) -> dict[str, bytes]:
        return {p.relative_to(repo.path).as_posix(): p.read_bytes() for p in repo.path.rglob("*") if p.is_file()}


class S3Where(Where):
    local = False

    def __init__(self, endpoint: str, bucket: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.bucket = bucket
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def loc(self, name: str = "repo") -> str:
        return f"s3://{self.bucket}/{name}?endpoint={self.endpoint}&region=us-east-1"

    def _now(self) -> float:
        r = self.client.head_bucket(Bucket=self.bucket)
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"]).timestamp()

    def tick(self) -> None:
        start = self._now()
        for _ in range(60):
            time.sleep(0.05)
            if self._now() > start:
                return
        raise AssertionError("the S3 server's clock does not move")

    def _key(self, repo_loc: str, name: str) -> str:
        prefix = repo_loc.split("?")[0].split("/", 3)[3]
        return f"{prefix}/{name}"

    def put_raw(self, repo_loc: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(repo_loc, name), Body=data)

    def get_raw(self, repo: Repository, name: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(repo.location, name))["Body"].read()
        return body

    def every_object(self, repo: Repository) -> dict[str, bytes]:
        prefix = self._key(repo.location, "")
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                body = self.client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                out[o["Key"][len(prefix) :]] = body
        return out

    def leftovers(self, repo: Repository) -> list[str]:
        prefix = self._key(repo.location, "")
        out = []
        for sub in ("leases/", "gc/"):
            r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix + sub)
            out += [o["Key"] for o in r.get("Contents", [])]
        return out


def new_repo(where: Path | Where) -> Repository:
    if isinstance(where, Where):
        return Repository.init(where.loc("repo"), CS)
    return Repository.init(where / "repo", CS)


def write_snapshot(repo: Repository, disk: str, blocks: list[bytes], parent: str = "none") -> Manifest:
    """Commit a snapshot made of ``blocks`` (each at most one chunk) through the public API."""
    with repo.begin_write(disk) as w:
        p = w.parent(parent)
        digests = [repo.store_chunk(b, w.lease)[0] for b in blocks]
        size = sum(len(b) for b in blocks)
        return w.commit(size, digests, p.id if p else None, {})


def rand_chunk(n: int = CS) -> bytes:
    return os.urandom(n)


def read_snapshot(repo: Repository, m: Manifest) -> bytes:
    return b"".join(
        bytes(m.chunk_length(i)) if d is None else repo.load_chunk(d, m.chunk_length(i)) for i, d in enumerate(m.chunks)
    )


def killed_writer_script(prelude: str = "") -> str:
    """``python -c`` code of a writer that stores three chunks of disk "d" in the repository named by its
    first argument, prints "ready" and waits to be killed (``prelude`` runs first)."""
    return f"""
import os, sys
{prelude}
from backup.repo.repository import Repository
repo = Repository.open(sys.argv[1])
w = repo.begin_write("d")
for i in range(3):
    repo.store_chunk(os.urandom(65536), w.lease)
print("ready", flush=True)
sys.stdin.read()
"""
