"""Fixtures shared by the tests, loaded as a plugin (``-p s3_fixtures`` in pyproject.toml) rather than as a
conftest.py: integration/ has the conftest module that its tests import, and two modules named conftest clash.
A moto S3 server (started once, on loopback) and the repository backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from repokit import LocalWhere, S3Where, Where


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    from s3kit import CREDENTIALS, MotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = MotoServer()
    try:
        yield server
    finally:
        server.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Where:
    """Where a test's repositories live: a directory, or a fresh bucket of the moto server."""
    if request.param == "local":
        return LocalWhere(tmp_path)
    from backup.repo import s3store

    monkeypatch.setattr(s3store, "GC_MARGIN", 0.0)  # one server clock: no skew to allow for
    server = request.getfixturevalue("s3_server")
    return S3Where(server.endpoint, server.new_bucket())
