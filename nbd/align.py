"""Alignment arithmetic, written once: sizes and offsets rounded to sectors, clusters, pages, blocks.

Integer-only (``-(-a // b)`` is an exact ceiling for any size; float division is not past 2**53).
"""

from __future__ import annotations

#: The unit of raw image sizes and of qcow2's compressed-cluster descriptors (QEMU's BDRV_SECTOR_SIZE).
SECTOR = 512


def div_up(value: int, unit: int) -> int:
    """How many ``unit``-sized pieces cover ``value`` bytes (a ceiling division)."""
    return -(-value // unit)


def round_up(value: int, unit: int) -> int:
    """``value`` rounded up to a multiple of ``unit``."""
    return -(-value // unit) * unit


def round_down(value: int, unit: int) -> int:
    """``value`` rounded down to a multiple of ``unit``."""
    return value // unit * unit


__all__ = ["SECTOR", "div_up", "round_down", "round_up"]
