"""--allow-dir confinement: inside, outside, relative, symlink escapes (final and middle components)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import PathNotAllowed
from server.paths import PathPolicy


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.img").write_bytes(b"x")
    return allowed, outside


def test_unconfined_allows_anything(tree: tuple[Path, Path]) -> None:
    _, outside = tree
    policy = PathPolicy()
    assert not policy.confined
    assert policy.resolve(outside / "secret.img") == (outside / "secret.img").resolve()


def test_inside_allowed_and_new_files(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    policy = PathPolicy([allowed])
    assert policy.resolve(allowed / "new.img") == allowed.resolve() / "new.img"
    (allowed / "sub").mkdir()
    assert policy.resolve(allowed / "sub" / ".." / "x.img") == allowed.resolve() / "x.img"


@pytest.mark.parametrize("candidate", ["../outside/secret.img", "sub/../../outside/secret.img"])
def test_dotdot_escape_refused(tree: tuple[Path, Path], candidate: str) -> None:
    allowed, _ = tree
    with pytest.raises(PathNotAllowed, match="outside the allowed"):
        PathPolicy([allowed]).resolve(f"{allowed}/{candidate}")


def test_relative_and_directory_itself_refused(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    policy = PathPolicy([allowed])
    with pytest.raises(PathNotAllowed, match="absolute"):
        policy.resolve("disk.img")
    with pytest.raises(PathNotAllowed):
        policy.resolve(allowed)
    with pytest.raises(PathNotAllowed):
        policy.resolve("")


def test_symlink_escapes_refused(tree: tuple[Path, Path]) -> None:
    allowed, outside = tree
    policy = PathPolicy([allowed])
    (allowed / "link.img").symlink_to(outside / "secret.img")
    (allowed / "dangling.img").symlink_to(outside / "not-yet.img")  # O_CREAT would follow it
    (allowed / "dir").symlink_to(outside)
    for name in ("link.img", "dangling.img", "dir/secret.img", "dir/new.img"):
        with pytest.raises(PathNotAllowed):
            policy.resolve(allowed / name)


def test_symlink_within_allowed_ok_and_allowed_dir_via_symlink(tree: tuple[Path, Path], tmp_path: Path) -> None:
    allowed, _ = tree
    (allowed / "real.img").write_bytes(b"")
    (allowed / "alias.img").symlink_to(allowed / "real.img")
    alias_dir = tmp_path / "alias-dir"
    alias_dir.symlink_to(allowed)
    policy = PathPolicy([alias_dir])  # the allowed directory itself given through a symlink
    assert policy.resolve(allowed / "alias.img") == allowed.resolve() / "real.img"


def test_check_backing_confines_chain_elements(tree: tuple[Path, Path]) -> None:
    """A backing file is checked like a named file; the error names it and the image that names it."""
    allowed, outside = tree
    image = str(allowed / "top.qcow2")
    assert PathPolicy().check_backing(str(outside / "secret.img"), image) == str(outside / "secret.img")
    policy = PathPolicy([allowed])
    (allowed / "base.img").write_bytes(b"")
    assert policy.check_backing(f"{allowed}/sub/../base.img", image) == str(allowed.resolve() / "base.img")
    (allowed / "link.img").symlink_to(outside / "secret.img")
    for name in (f"{allowed}/../outside/secret.img", str(allowed / "link.img")):
        with pytest.raises(PathNotAllowed, match="outside the allowed") as info:
            policy.check_backing(name, image)
        assert str(outside / "secret.img") in info.value.desc and image in info.value.desc
