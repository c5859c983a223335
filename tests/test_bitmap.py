"""ClusterBitmap against a plain list of booleans: range updates, counts, run scanning."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backup.bitmap import ClusterBitmap


def model_next(bits: list[bool], start: int, end: int, want: bool) -> int | None:
    for i in range(max(start, 0), min(end, len(bits))):
        if bits[i] == want:
            return i
    return None


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 300)),
    max_size=30,
)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(size=st.integers(0, 300), fill=st.booleans(), updates=ops, probes=st.lists(st.integers(0, 310), max_size=10))
def test_matches_a_list_model(size: int, fill: bool, updates: list[tuple[bool, int, int]], probes: list[int]) -> None:
    bitmap = ClusterBitmap(size, fill=fill)
    model = [fill] * size
    for value, a, b in updates:
        start, end = sorted((min(a, size), min(b, size)))
        changed = bitmap.set(start, end) if value else bitmap.clear(start, end)
        assert changed == sum(1 for i in range(start, end) if model[i] != value)
        model[start:end] = [value] * (end - start)
        assert bitmap.count == sum(model)
    assert [bitmap[i] for i in range(size)] == model
    for p in probes:
        for q in (p + 1, p + 9, size):
            assert bitmap.next_set(p, q) == model_next(model, p, q, True)
            assert bitmap.next_clear(p, q) == model_next(model, p, q, False)
            if p < size:
                lo, hi = sorted((p, min(q, size)))
                assert bitmap.count_range(lo, hi) == sum(model[lo:hi])
    runs = list(bitmap.runs())
    expected: list[tuple[int, int]] = []
    for i, bit in enumerate(model):
        if bit:
            if expected and expected[-1][1] == i:
                expected[-1] = (expected[-1][0], i + 1)
            else:
                expected.append((i, i + 1))
    assert runs == expected


def test_tail_bits_past_size_never_found() -> None:
    bitmap = ClusterBitmap(10, fill=True)
    assert bitmap.count == 10
    bitmap.clear(0, 10)
    assert bitmap.next_set(0) is None
    assert bitmap.next_clear(0) == 0
    assert bitmap.to_bytes() == b"\x00\x00"


def test_large_bitmap_scans_across_empty_space() -> None:
    clusters = 32 * 1024 * 1024  # a 2 TiB disk at 64 KiB clusters: 4 MiB of bits
    bitmap = ClusterBitmap(clusters)
    bitmap.set(clusters - 3, clusters - 1)
    assert bitmap.next_set(0) == clusters - 3
    assert bitmap.run_end(clusters - 3) == clusters - 1
    assert bitmap.count == 2
    assert len(bitmap.to_bytes()) == clusters // 8


def test_out_of_range_is_refused() -> None:
    bitmap = ClusterBitmap(8)
    with pytest.raises(IndexError):
        bitmap.set(4, 9)
    with pytest.raises(IndexError):
        _ = bitmap[8]
    with pytest.raises(ValueError):
        ClusterBitmap(-1)


@settings(deadline=None)
@given(size=st.integers(1, 100), fill=st.booleans(), flips=st.lists(st.tuples(st.booleans(), st.integers(0, 99))))
def test_single_bit_updates_keep_the_count(size: int, fill: bool, flips: list[tuple[bool, int]]) -> None:
    """One-bit updates (every guest copy of one granule) take their own short path."""
    bitmap = ClusterBitmap(size, fill=fill)
    model = [fill] * size
    for value, index in flips:
        index %= size
        changed = bitmap.set(index, index + 1) if value else bitmap.clear(index, index + 1)
        assert changed == (model[index] != value)
        model[index] = value
        assert bitmap.count == sum(model) and bitmap[index] == value
    assert [bitmap[i] for i in range(size)] == model
    assert bitmap.next_set(0) == next((i for i, bit in enumerate(model) if bit), None)


@settings(deadline=None, max_examples=60)
@given(
    size=st.integers(1, 100_000),
    fill=st.booleans(),
    runs=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 40)), max_size=6),
    probes=st.lists(st.integers(0, 100_000), min_size=1, max_size=8),
)
def test_searches_across_widening_windows_match_a_list_model(
    size: int, fill: bool, runs: list[tuple[int, int]], probes: list[int]
) -> None:
    """Bitmaps large enough that a search widens its window several times (64 bytes up to 4 KiB) and
    crosses window edges: few, short runs of the other value in a sea of ``fill``."""
    bitmap = ClusterBitmap(size, fill=fill)
    model = [fill] * size
    for start, length in runs:
        start, end = min(start, size), min(start + length, size)
        (bitmap.clear if fill else bitmap.set)(start, end)
        model[start:end] = [not fill] * (end - start)
    for probe in probes:
        for end in (None, min(size, probe + 70_000)):
            stop = size if end is None else end
            assert bitmap.next_set(probe, end) == model_next(model, probe, stop, True)
            assert bitmap.next_clear(probe, end) == model_next(model, probe, stop, False)
        if probe < size:
            found = model_next(model, probe, size, not model[probe])
            assert bitmap.run_end(probe) == (size if found is None else found)
    assert bitmap.count == sum(model)


def window_edges(nbytes: int) -> list[int]:
    """Byte offsets where a search from 0 starts a new window (64, 128, … bytes, then 4 KiB steps)."""
    edges, pos, window = [], 0, 64
    while pos < nbytes:
        pos += window
        edges.append(pos)
        window = min(window * 2, 4096)
    return edges


@pytest.mark.parametrize("fill", [False, True])
def test_a_lone_bit_is_found_on_either_side_of_every_window_edge(fill: bool) -> None:
    size = 100_000
    positions = sorted(
        {b * 8 + bit for edge in window_edges(size // 8) for b in (edge - 1, edge, edge + 1) for bit in range(8)}
    )
    bitmap = ClusterBitmap(size, fill=fill)
    for position in (p for p in positions if p < size):
        (bitmap.clear if fill else bitmap.set)(position, position + 1)
        assert (bitmap.next_clear(0) if fill else bitmap.next_set(0)) == position
        assert bitmap.run_end(0) == position
        (bitmap.set if fill else bitmap.clear)(position, position + 1)


@settings(deadline=None)
@given(
    size=st.integers(1, 300),
    sets=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=8),
    takes=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=12),
)
def test_take_clears_a_range_only_when_all_of_it_is_set(
    size: int, sets: list[tuple[int, int]], takes: list[tuple[int, int]]
) -> None:
    """A copy's claim: ``take`` clears ``[start, end)`` and says True exactly when every bit of it was
    set; otherwise nothing changes (bits, count)."""
    b = ClusterBitmap(size)
    model = [False] * size
    for a, z in sets:
        lo, hi = sorted((min(a, size), min(z, size)))
        b.set(lo, hi)
        model[lo:hi] = [True] * (hi - lo)
    for a, z in takes:
        lo, hi = sorted((min(a, size), min(z, size)))
        before = list(model)
        took = b.take(lo, hi)
        assert took == all(model[lo:hi])
        if took:
            model[lo:hi] = [False] * (hi - lo)
        assert [b[i] for i in range(size)] == model and b.count == sum(model), (before, lo, hi)
    with pytest.raises(IndexError):
        b.take(0, size + 1)


def model_take_runs(model: list[bool], start: int, end: int, budget: int, most: int) -> list[tuple[int, int]]:
    """``take_runs`` the slow way: walk bit by bit, cut the last run at the budget, clear what was taken."""
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end and budget > 0 and len(runs) < most:
        while pos < end and not model[pos]:
            pos += 1
        if pos >= end:
            break
        first = pos
        while pos < end and model[pos] and pos - first < budget:
            model[pos] = False
            pos += 1
        runs.append((first, pos))
        budget -= pos - first
    return runs


@settings(deadline=None)
@given(
    size=st.sampled_from([0, 1, 7, 8, 9, 130, 700, 6000, 40000]),
    density=st.sampled_from([0.002, 0.05, 0.5, 0.95, 1.0]),
    long_run=st.tuples(st.floats(0, 1), st.integers(0, 9000)),
    span=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    budget=st.sampled_from([1, 2, 16, 100, 10**9]),
    most=st.sampled_from([1, 3, 64, 10**6]),
    seed=st.integers(0, 2**32),
)
def test_take_runs_peels_runs_off_as_the_model_does(
    size: int,
    density: float,
    long_run: tuple[float, int],
    span: tuple[float, float],
    budget: int,
    most: int,
    seed: int,
) -> None:
    """A batch's claims in one pass: the runs of set bits in order, the last cut at the budget, all of
    them cleared; runs longer than the first 512-bit window and runs crossing windows included."""
    rnd = random.Random(seed)
    model = [rnd.random() < density for _ in range(size)]
    at = int(long_run[0] * size)
    model[at : at + long_run[1]] = [True] * len(model[at : at + long_run[1]])
    b = ClusterBitmap(size)
    for i, bit in enumerate(model):
        if bit:
            b.set(i, i + 1)
    start = int(span[0] * size)
    end = start + int(span[1] * (size - start))
    assert b.take_runs(start, end, budget, most) == model_take_runs(model, start, end, budget, most)
    assert [b[i] for i in range(size)] == model and b.count == sum(model)
