"""The alignment helpers and run merging that every layer shares."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbd.align import SECTOR, div_up, round_down, round_up
from nbd.runs import append_run


@given(value=st.integers(0, 2**70), unit=st.integers(1, 2**40))
def test_alignment_is_exact_integer_arithmetic(value: int, unit: int) -> None:
    up, down = round_up(value, unit), round_down(value, unit)
    assert up % unit == 0 and value <= up < value + unit
    assert down % unit == 0 and value - unit < down <= value
    assert div_up(value, unit) * unit == up


def test_sector_rounding() -> None:
    assert (round_up(1, SECTOR), round_up(512, SECTOR), round_up(513, SECTOR)) == (512, 512, 1024)


def test_append_run_merges_neighbours_of_one_kind_only() -> None:
    runs: list[tuple[int, int]] = []
    for length, kind in [(1, 0), (2, 0), (4, 3), (8, 0), (16, 0)]:
        append_run(runs, length, kind)
    assert runs == [(3, 0), (4, 3), (24, 0)]
