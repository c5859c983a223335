"""The backup repository: deduplicated, compressed, checksummed snapshots of disks (design §3.6).

The on-disk format is described in ``FORMAT.md`` beside this file.
"""
