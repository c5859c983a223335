"""The one L2 walk (``backup/qcow2/mapping.py``) every mapping question goes through, the header
read in one place, and the qcow2 package free of import cycles."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device, mapping
from backup.qcow2.header import read_header
from backup.qcow2.mapping import RunKind

CS = 65536
DATA, ZERO, UNALLOCATED, COMPRESSED = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED


async def test_exact_runs_follow_the_host_and_summary_runs_only_the_kind(tmp_path: Path) -> None:
    dev = await Qcow2Device.create(tmp_path / "img.qcow2", 16 * CS)
    try:
        await dev.pwrite(CS, b"\x11" * 2 * CS)  # clusters 1-2: one contiguous host run
        await dev.pwrite(0, b"\x22" * CS)  # cluster 0: after them on the host
        await dev.pwrite(3 * CS, b"\x33" * CS)
        await dev.zero(3 * CS, CS)  # cluster 3: the zero flag (on a kept allocation)
        dev.compress = True
        await dev.pwrite(5 * CS, bytes(2 * CS))  # clusters 5-6: compressed, one run each
        exact = dev.mapping.runs(0, 8 * CS)
        host = exact[1][3]
        assert [r[:3] for r in exact] == [
            (0, CS, DATA),
            (CS, 2 * CS, DATA),
            (3 * CS, CS, ZERO),
            (4 * CS, CS, UNALLOCATED),
            (5 * CS, CS, COMPRESSED),
            (6 * CS, CS, COMPRESSED),
            (7 * CS, CS, UNALLOCATED),
        ]
        assert exact[0][3] == host + 2 * CS
        assert exact[4][3] != exact[5][3]  # their L2 entries
        assert dev.mapping.runs(CS + 100, 200) == [(CS + 100, 200, DATA, host + 100)]
        assert dev.mapping.runs(0, 8 * CS, exact=False) == [
            (0, 3 * CS, DATA, 0),
            (3 * CS, CS, ZERO, 0),
            (4 * CS, CS, UNALLOCATED, 0),
            (5 * CS, 2 * CS, DATA, 0),
            (7 * CS, CS, UNALLOCATED, 0),
        ]
    finally:
        await dev.close()


async def test_a_range_without_l2_tables_is_one_run_and_spans_cut_at_tables(tmp_path: Path) -> None:
    dev = await Qcow2Device.create(tmp_path / "img.qcow2", 1 << 20, cluster_size=512)  # 32 KiB per L2 table
    try:
        await dev.pwrite(40000, b"x")
        assert dev.mapping.runs(0, 32768, exact=False) == [(0, 32768, UNALLOCATED, 0)]
        assert dev.mapping.runs(100, 65436, exact=False) == [
            (100, 39836, UNALLOCATED, 0),
            (39936, 512, DATA, 0),
            (40448, 25088, UNALLOCATED, 0),
        ]
        assert list(dev.mapping.spans(100, 70000)) == [(0, 100, 32768), (1, 32768, 65536), (2, 65536, 70000)]
        assert dev.mapping.index(40000) == 14
    finally:
        await dev.close()


async def test_header_is_read_whole_cluster_for_what_lies_past_its_fixed_part(tmp_path: Path) -> None:
    base = tmp_path / "b" / ("base-" + "n" * 150 + ".raw")
    base.parent.mkdir()
    base.write_bytes(bytes(CS))
    top = tmp_path / "top.qcow2"
    dev = await Qcow2Device.create(top, None, backing_file=str(base), backing_format="raw")
    await dev.close()
    fd = os.open(top, os.O_RDONLY)
    try:
        h = read_header(fd, os.fstat(fd).st_size, str(top))
        assert (h.backing_file, h.backing_format, h.size) == (str(base), "raw", CS)
    finally:
        os.close(fd)
    (tmp_path / "short").write_bytes(b"QFI\xfb")
    fd = os.open(tmp_path / "short", os.O_RDONLY)
    try:
        with pytest.raises(ImageFormatError, match="not a qcow2 image"):
            read_header(fd, 4, "short")
    finally:
        os.close(fd)


def _package_imports(package: Path, name: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (at any depth, type-checking ones too)."""
    graph: dict[str, set[str]] = {}
    for file in package.glob("*.py"):
        module = f"{name}.{file.stem}" if file.stem != "__init__" else name
        found: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(name):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith(name))
        graph[module] = found
    return {m: {d for d in deps if d in graph and d != name} - {m} for m, deps in graph.items()}


def test_the_qcow2_package_has_no_import_cycle() -> None:
    graph = _package_imports(Path(mapping.__file__).parent, "backup.qcow2")
    assert "backup.qcow2.mapping" in graph
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
