"""A qcow2 header for tests that build images by hand: one L1 entry, refcounts in the second cluster."""

from __future__ import annotations

from typing import Any

from backup.qcow2.header import ImageHeader


def small_header(**overrides: Any) -> ImageHeader:
    """A v3 header of 64 KiB clusters (10 MiB unless ``size`` is given); ``overrides`` replace any field."""
    fields: dict[str, Any] = dict(
        version=3,
        cluster_bits=16,
        size=10 << 20,
        crypt_method=0,
        l1_size=1,
        l1_table_offset=3 << 16,
        refcount_table_offset=1 << 16,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        header_length=104,
    )
    fields.update(overrides)
    return ImageHeader(**fields)
