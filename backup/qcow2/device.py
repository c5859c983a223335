"""``Qcow2Device``: a qcow2 image (v2/v3) as a ``BlockDevice`` — backup target, export, or source.

Writes allocate host clusters at the end of the file, so a backup's data lands in contiguous runs
written with one ``pwritev`` each; L2 tables and refcount blocks live in write-back caches and reach
the file on flush (or eviction). Crash safety follows QEMU's lazy-refcount scheme: the first
mutation sets the header's dirty bit (durably, before any metadata is written) and only a clean
``close`` clears it, so an image interrupted mid-backup reads as "not cleanly shut down" to
``qemu-img info`` (and ``was_dirty`` here) — detectably incomplete, never silently wrong. Opening
such an image for writing first rebuilds its refcounts (``repair.py``), as QEMU does. All I/O is
inline ``os.pread``/``os.pwrite`` (page cache hits beat a thread hop); compression runs in threads.
Where guest bytes are is asked of one walk over the tables (``mapping.py``); the coalesced data
writes and their overlap check are ``writer.py``'s. Persistent dirty bitmaps (``bitmaps.py``)
load at open; a read-write open marks them in_use on disk, as QEMU does, so a crash leaves them
inconsistent, and a clean close writes ``set_stored_bitmaps``' list to new clusters before the header
points to them and the old ones are freed.

Whatever a crash keeps, nothing durable points to what is not: a flush writes the metadata in
steps separated by syncs (``_write_metadata``), freed clusters are reused only after the flush
that made their freeing durable (``Refcounts.free``), guest data is never written over metadata
(``overlap.py``), and a failed sync fails every later flush, as QEMU's does.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
from collections.abc import Sequence

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.backing import (
    BackingCheck,
    BackingImage,
    RawBacking,
    chain_key,
    locate_backing,
    probe_backing_format,
    resolve_backing_path,
)
from backup.qcow2.bitmaps import (
    FLAG_AUTO,
    FLAG_IN_USE,
    Directory,
    StoredBitmap,
    check_bitmaps,
    clusters_of,
    encode_directory,
    encode_extension,
    load_directory,
    read_bitmaps,
    read_data,
    write_bitmaps,
)
from backup.qcow2.cache import TableCache
from backup.qcow2.codec import CodecError, codec_for, type_id_of
from backup.qcow2.errors import Qcow2CorruptError
from backup.qcow2.header import (
    ImageHeader,
    build_header,
    incompatible_names,
    l1_entries_for,
    read_header,
    rewrite_header,
)
from backup.qcow2.mapping import COMPRESSED, DATA, UNALLOCATED, ZERO, L2Map, read_l1
from backup.qcow2.overlap import MetadataMap
from backup.qcow2.refcount import Refcounts
from backup.qcow2.repair import repair_image
from backup.qcow2.writer import DataWriter
from nbd.align import SECTOR, div_up, round_down, round_up
from nbd.constants import State
from nbd.device import BlockLimits, Capabilities, Extent, FlushLatch
from nbd.device import allocation_depth as allocation_depth_of
from nbd.runs import append_run

log = logging.getLogger(__name__)

HOLE_ZERO = State.HOLE | State.ZERO
DEFAULT_L2_CACHE = 8 * 1024 * 1024
_U64 = q.U64
_CPUS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _BackingRead:
    """A read in flight in the backing file, over guest bytes ``[start, end)``."""

    __slots__ = ("done", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = asyncio.Event()


async def _backing_depth(backing: BackingImage | None, offset: int, length: int) -> list[tuple[int, int]]:
    """The allocation depth of a range in a backing file: 0 without one, 1 everywhere in a raw file
    (QEMU counts its holes as allocated) and past the end of any backing file (so ``qemu-nbd -A``
    answers for a top image longer than its backing), else the backing image's own answer."""
    if backing is None:
        return [(length, 0)]
    inside = max(0, min(length, backing.size - offset))
    runs: list[tuple[int, int]] = []
    if inside:
        depth = allocation_depth_of(backing)
        runs = await depth(offset, inside) if depth is not None else [(inside, 1)]
    if inside < length:
        runs.append((length - inside, 1))
    return runs


class Qcow2Device:
    """A qcow2 image opened for reading (any image) or reading and writing (see ``open``)."""

    format_name = "qcow2"

    def __init__(
        self,
        path: str,
        fd: int,
        header: ImageHeader,
        l1: list[int],
        *,
        read_only: bool,
        refcounts: Refcounts | None,
        backing: BackingImage | None,
        owns_backing: bool = True,
        compress: bool,
        l2_cache_size: int,
    ) -> None:
        self.path = path
        self.header = header
        self.backing = backing
        self._owns_backing = owns_backing
        self.compress = compress
        self.was_dirty = bool(header.incompatible & q.INCOMPAT_DIRTY)
        self._fd = fd
        self._read_only = read_only
        self._refs = refcounts
        self._l1 = l1
        self._l1_dirty_lo = len(l1)
        self._l1_dirty_hi = -1
        self._cb = header.cluster_bits
        self._cs = header.cluster_size
        self._l2 = TableCache(
            fd,
            self._cs,
            l2_cache_size // self._cs,
            on_short_read=lambda off: Qcow2CorruptError(path, f"L2 table {off:#x} lies past the end of the file"),
        )
        self.mapping = L2Map(header, l1, self._l2, self._corrupt)
        self._zero_flag = self.mapping.zero_flag
        self._codec = codec_for(header.compression_type, path)
        self._compress = self._codec.compress
        self._cbyte = 0  # next free byte of the cluster holding compressed data (0: none)
        self._lock = asyncio.Lock()
        self._marked_dirty = self.was_dirty
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._backing_reads: list[_BackingRead] = []  # see _after_backing_reads
        self._zero_cluster = bytes(self._cs)
        self._decompressed: tuple[int, bytes] | None = None  # last compressed cluster read
        self._flush_latch = FlushLatch(str(path))  # once a sync failed, every later one fails
        self._marked_corrupt = False  # a write would have hit metadata: no more writes
        self._meta = MetadataMap() if refcounts is None else refcounts.meta  # for the overlap check
        if refcounts is not None:
            self._meta.add(0)  # the header, its extensions and the backing file name
            if header.l1_size:
                self._meta.add(header.l1_table_offset >> self._cb, div_up(header.l1_size * 8, self._cs))
            self._meta.add_all((e & q.L1E_OFFSET_MASK) >> self._cb for e in l1 if e & q.L1E_OFFSET_MASK)
            self._l2.before_evict = self._before_l2_evict
        self._writer = DataWriter(fd, self._meta, self._cb, self._metadata_overlap)
        self.stored_bitmaps: list[StoredBitmap] = []  # as loaded at open (in_use: inconsistent)
        self._bitmap_dir: Directory | None = None  # where they are on disk (read-write opens)
        self._bitmaps_to_store: list[StoredBitmap] | None = None  # set_stored_bitmaps' list
        self._loaded_key: list[tuple[str, int, bool, bytes]] = []  # what is on disk, but for in_use
        self._guest_written = False  # a recording (auto) bitmap loaded at open missed these writes

    # --- opening and creating ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        compress: bool = False,
        l2_cache_size: int = DEFAULT_L2_CACHE,
        backing_device: BackingImage | None = None,
        repair: bool = True,
        check_backing: BackingCheck | None = None,
        _chain: tuple[str, ...] = (),
    ) -> Qcow2Device:
        """Open an image; its backing chain (if any) is opened read-only.

        ``backing_device`` reads the backing file through a device this process already has open
        (the live source of a fleecing backup: its caches are the truth, not the file's metadata),
        also for an image whose header names no backing file (QEMU's ``backing`` option); it stays
        open when this device closes. An image that was not cleanly closed (dirty bit) opens
        read-only as it is; for writing its refcounts are rebuilt first, as QEMU does, unless
        ``repair`` is False, which refuses it. ``check_backing`` sees every file of the backing chain
        before it is opened (the daemon's path policy) and may refuse it.
        """
        path = os.fspath(path)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        backing: BackingImage | None = None
        try:
            file_size = os.lseek(fd, 0, os.SEEK_END)  # block devices too
            header = read_header(fd, file_size, path)
            if not read_only:
                _check_writable(header, path, repair=repair)
                if header.incompatible & q.INCOMPAT_DIRTY:
                    # As QEMU does for lazy refcounts: trust the tables, rebuild the refcounts.
                    os.close(fd)
                    fd = -1
                    log.warning("%s was not cleanly closed: rebuilding its refcounts before writing", path)
                    repair_image(path)
                    return await cls.open(
                        path,
                        read_only=read_only,
                        compress=compress,
                        l2_cache_size=l2_cache_size,
                        backing_device=backing_device,
                        repair=False,
                        check_backing=check_backing,
                        _chain=_chain,
                    )
            l1 = read_l1(fd, header, file_size, path)
            refs = None if read_only else Refcounts.load(fd, header, file_size, path)
            if header.backing_file is not None and backing_device is None:
                chain = (*_chain, chain_key(path))
                backing = await _open_backing(header.backing_file, header.backing_format, path, chain, check_backing)
            if header.incompatible & q.INCOMPAT_DIRTY:
                log.warning("%s was not cleanly closed (dirty bit set); reading it as it is", path)
            device = cls(
                path,
                fd,
                header,
                l1,
                read_only=read_only,
                refcounts=refs,
                backing=backing if backing_device is None else backing_device,
                owns_backing=backing_device is None,
                compress=compress,
                l2_cache_size=l2_cache_size,
            )
            device._load_bitmaps(file_size)
            return device
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if backing is not None:
                await backing.close()
            raise

    @classmethod
    async def create(
        cls,
        path: str | os.PathLike[str],
        size: int | None,
        *,
        cluster_size: int = 65536,
        backing_file: str | None = None,
        backing_format: str | None = None,
        compress: bool = False,
        compression_type: str = "zlib",
        l2_cache_size: int = DEFAULT_L2_CACHE,
        backing_device: BackingImage | None = None,
    ) -> Qcow2Device:
        """Create (or overwrite, as ``qemu-img create`` does) a v3 image and open it for writing.

        ``compression_type`` "zlib" (deflate, readable by every QEMU) or "zstd" (QEMU >= 5.1).

        ``size`` None takes the backing file's virtual size; sizes round up to 512 bytes.
        ``backing_device``: see ``open`` (the header still names ``backing_file``).
        """
        path = os.fspath(path)
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 1 << q.MAX_CLUSTER_BITS:
            raise ImageFormatError(f"cluster size {cluster_size} must be a power of two from 512 B to 2 MiB")
        cluster_bits = cluster_size.bit_length() - 1
        if backing_device is not None and backing_file is None:
            raise ImageFormatError("backing_device needs backing_file: the image must name its backing file")
        compression = type_id_of(compression_type)
        codec_for(compression, path)
        if backing_file is not None:
            resolved = locate_backing(backing_file, path, ())
            if backing_format is None:
                backing_format = probe_backing_format(resolved)
            if size is None and backing_device is not None:
                size = backing_device.size
            elif size is None:
                probe = await _open_backing(backing_file, backing_format, path, ())
                size = probe.size
                await probe.close()
        if size is None or size < 0:
            raise ImageFormatError("a qcow2 image needs a virtual size (or a backing file to take it from)")
        size = round_up(size, SECTOR)
        l1_size = l1_entries_for(size, cluster_bits)
        if l1_size * 8 > q.MAX_L1_BYTES:
            raise ImageFormatError(f"virtual size {size} is too large for {cluster_size}-byte clusters")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            refs = Refcounts(
                fd,
                path,
                cluster_bits=cluster_bits,
                order=4,
                reftable=[0] * (cluster_size // 8),
                reftable_offset=cluster_size,
                reftable_clusters=1,
                alloc_end=2,
            )
            refs.add(0, 1)  # header; also allocates the first refcount block
            refs.add(1, 1)  # refcount table
            l1_clusters = div_up(l1_size * 8, cluster_size)
            l1_offset = refs.alloc(l1_clusters) << cluster_bits if l1_size else 0
            header = ImageHeader(
                version=3,
                cluster_bits=cluster_bits,
                size=size,
                crypt_method=0,
                l1_size=l1_size,
                l1_table_offset=l1_offset,
                refcount_table_offset=refs.reftable_offset,
                refcount_table_clusters=refs.reftable_clusters,
                nb_snapshots=0,
                snapshots_offset=0,
                refcount_order=4,
                header_length=q.V3_HEADER_LENGTH,
                backing_file=backing_file,
                backing_format=backing_format,
                compression_type=compression,
            )
            os.pwrite(fd, build_header(header), 0)
            refs.flush()
            os.ftruncate(fd, refs.alloc_end << cluster_bits)  # the L1 table reads as zeroes
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        try:
            return await cls.open(path, compress=compress, l2_cache_size=l2_cache_size, backing_device=backing_device)
        except BaseException:
            os.unlink(path)
            raise

    # --- persistent bitmaps ----------------------------------------------------------------------

    def _load_bitmaps(self, file_size: int) -> None:
        """Load the stored bitmaps. Read-only: as they are (bitmaps we cannot read are skipped).
        Read-write: bitmaps we could not write back intact refuse the open, and the others are
        marked in_use on disk now, as QEMU does, so a crash leaves them inconsistent."""
        h = self.header
        if self._read_only:
            try:
                self.stored_bitmaps = read_bitmaps(self._fd, h, file_size, self.path)
            except ImageFormatError as exc:
                log.warning("%s; reading the image without them", exc)
            return
        try:
            directory = load_directory(self._fd, h, file_size, self.path)
        except ImageFormatError as exc:
            raise ImageFormatError(f"{exc}: the image can only be opened read-only") from None
        if directory is None:
            return
        self.stored_bitmaps = [
            StoredBitmap(
                name=e.name,
                granularity=1 << e.granularity_bits,
                in_use=bool(e.flags & FLAG_IN_USE),
                auto=bool(e.flags & FLAG_AUTO),
                data=read_data(self._fd, h, e),
            )
            for e in directory.entries
        ]
        self._bitmap_dir = directory
        self._loaded_key = [(b.name, b.granularity, b.auto, b.data) for b in self.stored_bitmaps]
        self._meta.add_all(clusters_of(directory, self._cb))
        self._set_flags_in_place([True] * len(directory.entries))

    def _set_flags_in_place(self, in_use: list[bool]) -> None:
        """QEMU's in-place update of the in_use flags: the extension is untrusted (autoclear bit
        clear) while the directory is rewritten, so a torn directory write is never believed."""
        directory = self._bitmap_dir
        assert directory is not None
        flags = [
            (e.flags & ~FLAG_IN_USE) | (FLAG_IN_USE if u else 0) for e, u in zip(directory.entries, in_use, strict=True)
        ]
        if flags == [e.flags for e in directory.entries] and self.header.autoclear & q.AUTOCLEAR_BITMAPS:
            return
        self._write_autoclear(self.header.autoclear & ~q.AUTOCLEAR_BITMAPS)
        for e, f in zip(directory.entries, flags, strict=True):
            e.flags = f
        os.pwrite(self._fd, encode_directory(directory.entries), directory.offset)
        self._sync()
        self._write_autoclear(q.AUTOCLEAR_BITMAPS)

    def _write_autoclear(self, autoclear: int) -> None:
        h = self.header
        h.autoclear = autoclear
        os.pwrite(self._fd, q.FEATURE_FIELDS_FAST.pack(h.incompatible, h.compatible, h.autoclear), q.INCOMPAT_OFFSET)
        self._sync()

    def set_stored_bitmaps(self, bitmaps: list[StoredBitmap]) -> None:
        """The bitmaps a clean ``close`` writes (replacing those stored); checked now."""
        if self._read_only:
            raise OSError(errno.EROFS, f"{self.path}: image is open read-only: its bitmaps cannot change")
        check_bitmaps(bitmaps, self.header, self.path)
        if bitmaps:  # the extension must fit in the first cluster (512-byte clusters, long backing names)
            rewrite_header(os.pread(self._fd, self._cs, 0), self.header, bytes(24))
        self._bitmaps_to_store = list(bitmaps)

    async def remove_stored_bitmap(self, name: str) -> None:
        """Take bitmap ``name`` off the image now, as QEMU's ``block-dirty-bitmap-remove`` does for a
        persistent bitmap (so a crash does not bring it back); the others stay as the open left them
        on disk (in_use). Nothing to do for a bitmap the image does not hold, or a read-only open."""
        if self._read_only or self._bitmap_dir is None or name not in [b.name for b in self.stored_bitmaps]:
            return
        async with self._lock:
            self._check_open()
            keep = [b for b in self.stored_bitmaps if b.name != name]
            self._store_bitmaps_locked([StoredBitmap(b.name, b.granularity, True, b.auto, b.data) for b in keep])
            self.stored_bitmaps = keep
            self._loaded_key = [(b.name, b.granularity, b.auto, b.data) for b in keep]

    def _bitmaps_for_close(self) -> list[StoredBitmap] | None:
        """What close writes: ``set_stored_bitmaps``' list; else the loaded bitmaps, those that
        recorded (auto) left in_use when guest writes went by them unrecorded; None: nothing to do."""
        if self.header.version < 3:  # no auto-clear bits: v2 images carry no bitmaps
            return None
        if self._bitmaps_to_store is not None:
            if not self._bitmaps_to_store and self._bitmap_dir is None and self.header.bitmaps_ext is None:
                return None
            return self._bitmaps_to_store
        if self._bitmap_dir is None:
            return None
        return [
            StoredBitmap(b.name, b.granularity, b.in_use or (b.auto and self._guest_written), b.auto, b.data)
            for b in self.stored_bitmaps
        ]

    def _store_bitmaps_locked(self, bitmaps: list[StoredBitmap]) -> None:
        """Write new bitmap clusters, make them durable, point the header at them, then free the old
        ones: a crash at any point leaves either the old bitmaps (in_use) or the new ones."""
        loaded = self._bitmap_dir
        if loaded is not None and [(b.name, b.granularity, b.auto, b.data) for b in bitmaps] == self._loaded_key:
            self._set_flags_in_place([b.in_use for b in bitmaps])  # only flags changed: no new clusters
            return
        refs = self._begin_write(guest=False)
        h = self.header
        directory, allocated = write_bitmaps(self._fd, h, refs, bitmaps, self.path)
        self._meta.add_all(allocated)
        self._flush_locked()
        first = os.pread(self._fd, self._cs, 0)
        ext = None if directory is None else encode_extension(directory)
        h.autoclear = (h.autoclear | q.AUTOCLEAR_BITMAPS) if ext else (h.autoclear & ~q.AUTOCLEAR_BITMAPS)
        os.pwrite(self._fd, rewrite_header(first, h, ext), 0)
        self._sync()
        h.bitmaps_ext = ext
        if self._bitmap_dir is not None:
            for cluster in clusters_of(self._bitmap_dir, self._cb):
                refs.free(cluster, metadata=True)
        self._bitmap_dir = directory

    # --- BlockDevice properties --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def backing_path(self) -> str | None:
        """The backing file's path as QEMU resolves it (relative names: next to the image), or None."""
        name = self.header.backing_file
        return None if name is None else resolve_backing_path(name, self.path)

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def capabilities(self) -> Capabilities:
        writable = not self._read_only
        return Capabilities(
            can_flush=writable,
            can_fua=writable,
            can_trim=writable,
            can_zero=writable,
            can_fast_zero=writable and self._zero_flag != 0,
            can_cache=True,
            can_multi_conn=True,
            can_extents=True,
        )

    @property
    def block_limits(self) -> BlockLimits:
        return BlockLimits(minimum=1, preferred=max(4096, min(self._cs, 2 * 1024 * 1024)))

    # --- helpers -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        """Again after any wait: a request that waited (for the lock, its compression threads, the
        backing file) while ``close`` ran must not use the descriptor number, which another file may
        own by now."""
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: device is closed")

    def _check(self, offset: int, length: int, *, write: bool = False) -> None:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: device is closed")
        if write and self._read_only:
            raise OSError(errno.EPERM, f"{self.path}: image is open read-only")
        if offset < 0 or length < 0 or offset + length > self.header.size:
            raise OSError(errno.ENOSPC if write else errno.EINVAL, "request beyond the end of the device")

    def _corrupt(self, message: str) -> Qcow2CorruptError:
        return Qcow2CorruptError(self.path, message)

    async def _backing_read(self, offset: int, length: int) -> bytes:
        backing = self.backing
        if backing is None or offset >= backing.size:
            return bytes(length)
        n = min(length, backing.size - offset)
        data = await backing.pread(offset, n)
        return data if n == length else data + bytes(length - n)

    def _read_compressed(self, entry: int) -> bytes:
        cached = self._decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        offset, nbytes = q.decode_compressed(entry, self._cb)
        raw = os.pread(self._fd, nbytes, offset)
        try:
            data = self._codec.decompress(raw, self._cs)
        except CodecError as exc:
            raise self._corrupt(f"compressed cluster at {offset:#x} does not decompress: {exc}") from None
        if len(data) != self._cs:
            raise self._corrupt(f"compressed cluster at {offset:#x} inflates to {len(data)} bytes")
        self._decompressed = (entry, data)
        return data

    # --- reads -----------------------------------------------------------------------------------------

    async def pread(self, offset: int, length: int) -> bytes:
        """Reads take no lock, so every host cluster the mapping names is read before the first await.

        A backing read suspends; while it does, a trim/zero/rewrite may free a mapped host cluster
        and the allocator may hand it to another guest cluster (or ``close`` may free the descriptor
        number). Reading the image's own clusters first, with no await since the mapping was taken,
        means they hold exactly what the mapping said; only the backing pieces are read after a
        suspension, and they come from the backing file, which this image never frees or reuses.
        """
        self._check(offset, length)
        runs = self.mapping.runs(offset, length)
        pieces: list[bytes] = []
        backing: list[int] = []  # indexes into pieces (and runs) still to read from the backing file
        has_backing = self.backing is not None
        for pos, n, kind, host in runs:
            if kind == DATA:
                data = os.pread(self._fd, n, host)
                pieces.append(data if len(data) == n else data.ljust(n, b"\0"))  # past EOF: zeroes, as QEMU
            elif kind == COMPRESSED:
                in_off = pos & (self._cs - 1)
                pieces.append(self._read_compressed(host)[in_off : in_off + n])
            elif kind == UNALLOCATED and has_backing:
                backing.append(len(pieces))
                pieces.append(b"")
            else:
                pieces.append(self._zero_cluster[:n] if n <= self._cs else bytes(n))
        if backing:
            last, n, _, _ = runs[backing[-1]]
            record = _BackingRead(runs[backing[0]][0], last + n)
            self._backing_reads.append(record)
            try:
                for index in backing:
                    pos, n, _, _ = runs[index]
                    pieces[index] = await self._backing_read(pos, n)
            finally:
                self._backing_reads.remove(record)
                record.done.set()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _after_backing_reads(self, offset: int, length: int) -> None:
        """A write is done once the reads that mapped its range to the backing file are: reads that
        start later find the new mapping. In the fleecing scheme the backing file is the live source
        and this write is a copy-before-write, after which the guest overwrites the source: a read
        still in the backing file (a thread may run it late) would return the guest's new data."""
        end = offset + length
        for record in [r for r in self._backing_reads if r.start < end and offset < r.end]:
            await record.done.wait()

    # --- block status --------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        if length == 0:
            return []
        length = min(length, self._cs << 16)  # bound the work of one call; callers continue from the end
        extents: list[Extent] = []

        def add(n: int, flags: int) -> None:
            if extents and extents[-1].flags == flags:
                extents[-1] = Extent(extents[-1].length + n, flags)
            else:
                extents.append(Extent(n, flags))

        for pos, n, kind, _ in self.mapping.runs(offset, length, exact=False):
            if kind == DATA:
                add(n, 0)
            elif kind == ZERO or self.backing is None or pos >= self.backing.size:
                add(n, HOLE_ZERO)
            else:
                below = min(n, self.backing.size - pos)
                got = 0
                for ext in await self.backing.block_status(pos, below):
                    add(ext.length, ext.flags)
                    got += ext.length
                self._check_open()  # closed while the backing answered: no answer from a closed device
                if got < below:
                    break  # the backing stopped early: report what we know
                if below < n:
                    add(n - below, HOLE_ZERO)
        return extents

    async def top_allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs of (length, allocated in this image): what ``sync=top`` copies (zero clusters count)."""
        self._check(offset, length)
        out: list[tuple[int, bool]] = []
        for _, n, kind, _ in self.mapping.runs(offset, length, exact=False):
            allocated = kind != UNALLOCATED
            if out and out[-1][1] == allocated:
                out[-1] = (out[-1][0] + n, allocated)
            else:
                out.append((n, allocated))
        return out

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs of (length, depth) as QEMU's ``qemu:allocation-depth``: 1 where this image holds the
        bytes (zero clusters count), 1 + the backing file's depth elsewhere, 0 where no layer does."""
        self._check(offset, length)
        out: list[tuple[int, int]] = []
        for pos, n, kind, _ in self.mapping.runs(offset, length, exact=False):
            if kind != UNALLOCATED:
                append_run(out, n, 1)
                continue
            for run, depth in await _backing_depth(self.backing, pos, n):
                append_run(out, run, depth + 1 if depth else 0)
            self._check_open()
        return out

    # --- writes ----------------------------------------------------------------------------------------

    def _begin_write(self, *, guest: bool = True) -> Refcounts:
        """Before the first change: make the dirty bit durable (v3), so a crash stays detectable."""
        refs = self._refs
        assert refs is not None
        self._guest_written |= guest
        if self._marked_corrupt:
            raise self._corrupt("a write would have overwritten metadata; the image is marked corrupt")
        if not self._marked_dirty:
            h = self.header
            if h.version >= 3:
                # Auto-clear data we do not maintain becomes stale once we write; bitmaps we loaded
                # (marked in_use) we do maintain.
                h.autoclear &= q.AUTOCLEAR_BITMAPS if self._bitmap_dir is not None else 0
                h.incompatible |= q.INCOMPAT_DIRTY
                os.pwrite(
                    self._fd, q.FEATURE_FIELDS_FAST.pack(h.incompatible, h.compatible, h.autoclear), q.INCOMPAT_OFFSET
                )
                self._sync()
            self._marked_dirty = True
        return refs

    def _metadata_overlap(self, start: int, end: int, cluster: int) -> Qcow2CorruptError:
        """QEMU's answer to guest data aimed at metadata: refuse the write, mark the image corrupt
        (it then opens read-only until ``qemu-img check -r`` repairs it) and refuse later writes."""
        log.error(
            "%s: refusing to write guest data to host bytes %#x-%#x: cluster %#x holds metadata; "
            "marking the image corrupt",
            self.path,
            start,
            end,
            cluster << self._cb,
        )
        if not self._marked_corrupt:
            self._marked_corrupt = True
            h = self.header
            if h.version >= 3:
                h.incompatible |= q.INCOMPAT_CORRUPT
                try:
                    os.pwrite(self._fd, q.FEATURE_FIELDS_FAST.pack(h.incompatible, h.compatible, 0), q.INCOMPAT_OFFSET)
                    self._sync()
                except OSError as exc:
                    log.error("%s: could not mark the image corrupt: %s", self.path, exc)
        return self._corrupt(
            f"refusing a guest write to host bytes {start:#x}-{end:#x}: "
            f"it overlaps metadata (cluster {cluster << self._cb:#x})"
        )

    def _l1_set(self, index: int, value: int) -> None:
        self._l1[index] = value
        self._l1_dirty_lo = min(self._l1_dirty_lo, index)
        self._l1_dirty_hi = max(self._l1_dirty_hi, index)

    def _l2_for_write(self, refs: Refcounts, l1_index: int) -> tuple[int, bytearray]:
        entry = self._l1[l1_index]
        off = entry & q.L1E_OFFSET_MASK
        if not off:
            off = refs.alloc(1) << self._cb
            self._meta.add(off >> self._cb)
            table = self._l2.new(off)
            self._l1_set(l1_index, off | q.OFLAG_COPIED)
            return off, table
        table = self._l2.get(off)
        if not entry & q.OFLAG_COPIED:
            if refs.get(off >> self._cb) == 1:
                self._l1_set(l1_index, off | q.OFLAG_COPIED)
            else:  # shared with a snapshot: copy on write
                new_off = refs.alloc(1) << self._cb
                self._meta.add(new_off >> self._cb)
                new_table = self._l2.new(new_off)
                new_table[:] = table
                for i in range(len(table) // 8):  # shared clusters: refcounts already count both tables
                    e = _U64.unpack_from(table, i * 8)[0]
                    if e & q.L2E_OFFSET_MASK and not e & q.OFLAG_COMPRESSED:
                        _U64.pack_into(new_table, i * 8, e & ~q.OFLAG_COPIED)
                refs.free(off >> self._cb, metadata=True)
                self._l1_set(l1_index, new_off | q.OFLAG_COPIED)
                return new_off, new_table
        return off, table

    def _release(self, refs: Refcounts, entry: int) -> None:
        """Drop this L2 entry's references to host clusters."""
        if entry & q.OFLAG_COMPRESSED:
            offset, _ = q.decode_compressed(entry, self._cb)
            start = offset & ~(q.SECTOR - 1)
            _, shift, smask = q.compressed_fields(self._cb)
            last = start + (((entry >> shift) & smask) + 1) * q.SECTOR - 1
            for c in range(start >> self._cb, (last >> self._cb) + 1):
                self._unref(refs, c)
            if self._decompressed is not None and self._decompressed[0] == entry:
                self._decompressed = None
            return
        host = entry & q.L2E_OFFSET_MASK
        if host:
            self._unref(refs, host >> self._cb)

    def _unref(self, refs: Refcounts, cluster: int) -> None:
        refs.free(cluster)  # quarantined until the next flush: see _release_quarantine

    def _check_host(self, refs: Refcounts, host: int) -> None:
        if host >> self._cb >= refs.alloc_end:
            raise self._corrupt(f"L2 entry points to {host:#x}, past the end of the image")

    def _alloc_bytes(self, refs: Refcounts, size: int) -> int:
        """Room for ``size`` compressed bytes, packed after the previous ones as QEMU packs them."""
        cb, cs = self._cb, self._cs
        tail = self._cbyte
        if tail:
            c = tail >> cb
            room_end = (c + 1) << cb
            if refs.get(c) < refs.max_refcount:
                if tail + size <= room_end:
                    refs.add(c, 1)
                    self._cbyte = tail + size if tail + size < room_end else 0
                    return tail
                if c + 1 == refs.alloc_end:  # spill into fresh clusters right after the tail
                    extra = div_up(tail + size - room_end, cs)
                    start = refs.alloc(extra, from_end=True)
                    if start == c + 1:
                        refs.add(c, 1)
                        end = tail + size
                        self._cbyte = end if end & (cs - 1) else 0
                        return tail
                    for k in range(start, start + extra):  # not contiguous after all: give them back
                        refs.add(k, -1)
        n = div_up(size, cs)
        start = refs.alloc(n, from_end=True)
        end = (start << cb) + size
        self._cbyte = end if end & (cs - 1) else 0
        return start << cb

    async def _old_content(self, entry: int, vpos: int) -> bytearray:
        """A cluster's current contents (for merging a partial write into a fresh cluster)."""
        kind = self.mapping.kind(entry)
        if kind == COMPRESSED:
            return bytearray(self._read_compressed(entry))
        if kind == ZERO:
            return bytearray(self._cs)
        if kind == DATA:
            data = os.pread(self._fd, self._cs, entry & q.L2E_OFFSET_MASK)
            return bytearray(data.ljust(self._cs, b"\0"))
        data = await self._backing_read(vpos, min(self._cs, self.header.size - vpos))
        return bytearray(data.ljust(self._cs, b"\0"))

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        self._check(offset, len(mv), write=True)
        blobs = None
        if self.compress and len(mv) >= self._cs:
            blobs = await self._compress_parallel(offset, mv)
        async with self._lock:
            self._check_open()
            await self._write(offset, mv, blobs)
            if fua:
                self._flush_locked()
        if self._backing_reads:
            await self._after_backing_reads(offset, len(mv))

    async def _compress_parallel(self, offset: int, mv: memoryview) -> dict[int, bytes]:
        """Compressed images of the whole clusters the request covers, by guest cluster index.

        The codecs release the GIL: the clusters are split over one worker thread per core, outside
        the lock, so even a single sequential writer compresses on every core.
        """
        cs = self._cs
        first = round_up(offset, cs)
        positions = list(range(first, offset + len(mv) - cs + 1, cs))
        if not positions:
            return {}
        parts = min(len(positions), _CPUS)
        step = div_up(len(positions), parts)
        chunks = [positions[i : i + step] for i in range(0, len(positions), step)]
        results = await asyncio.gather(
            *(asyncio.to_thread(self._compress_clusters, offset, mv, chunk) for chunk in chunks)
        )
        blobs: dict[int, bytes] = {}
        for part in results:
            blobs.update(part)
        return blobs

    def _compress_clusters(self, offset: int, mv: memoryview, positions: list[int]) -> dict[int, bytes]:
        cs = self._cs
        return {pos >> self._cb: self._compress(mv[pos - offset : pos - offset + cs]) for pos in positions}

    async def _write(self, offset: int, mv: memoryview, blobs: dict[int, bytes] | None = None) -> None:
        await self._write_pieces([(offset, mv)], blobs)

    async def pwrite_many(self, pieces: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Several writes at scattered offsets, as one: a backup's incremental copies clusters all over
        the disk, and taking the lock, allocating and writing once per batch instead of once per
        cluster costs a fifth less. Fresh clusters for all pieces are allocated one after the other,
        so their data goes out in one ``pwritev``. Pieces that share a cluster are written one after
        the other, in the order given (the second must see the first's mapping); so are the pieces
        of a compressing image (``pwrite`` compresses a piece on every core)."""
        if self.compress:  # each piece compressed on every core, as ``pwrite`` does
            for offset, data in pieces:
                await self.pwrite(offset, data)
            return
        views: list[tuple[int, memoryview]] = []
        for offset, data in pieces:
            mv = memoryview(data)
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
            self._check(offset, len(mv), write=True)
            if len(mv):
                views.append((offset, mv))
        if not views:
            return  # nothing to write: the image is not even marked dirty
        ordered = sorted(views, key=lambda piece: piece[0])
        cb = self._cb
        disjoint = all((a + len(mv) - 1) >> cb < b >> cb for (a, mv), (b, _) in itertools.pairwise(ordered))
        async with self._lock:
            self._check_open()
            if disjoint:
                await self._write_pieces(ordered)
            else:  # in the order given, as separate writes would land
                for piece in views:
                    await self._write_pieces([piece])
        for offset, mv in views:
            if self._backing_reads:
                await self._after_backing_reads(offset, len(mv))

    async def _write_pieces(self, pieces: list[tuple[int, memoryview]], blobs: dict[int, bytes] | None = None) -> None:
        """Write through the L2 tables; ``pieces`` share no cluster.

        Ordering keeps readers and failures safe: all the data reaches the file first, then the L2
        entries change (no await in between), and only then are the replaced clusters released. A
        failure part-way leaks fresh clusters at worst; it never leaves an entry pointing at a freed
        one. A table is looked up once per call and its object kept to the end, so that an eviction
        in between (another table read meanwhile) cannot split its updates over two copies.
        """
        refs = self._begin_write()
        writer = self._writer
        writer.reset()
        tables: dict[int, tuple[int, bytearray]] = {}  # by L1 index: (table offset, table)
        placed: list[tuple[bytearray, list[tuple[int, int]], list[int]]] = []
        fresh: list[tuple[list[tuple[int, int]], int, memoryview | bytearray]] = []  # (updates, index, data)
        # A whole cluster that is not written in place (unallocated, shared, zero or compressed: what
        # a backup's copies meet) only needs a fresh cluster: decided here, without ``_write_table``.
        cs, cb, mapping = self._cs, self._cb, self.mapping
        whole: dict[int, tuple[list[tuple[int, int]], list[int]]] = {}  # by L1 index: (updates, released)
        shift, l2_mask = mapping.l2_bits + cb, mapping.l2_mask
        in_place = q.OFLAG_COPIED | q.OFLAG_COMPRESSED
        direct = blobs is None and not self.compress
        try:
            for offset, mv in pieces:
                if direct and len(mv) == cs and not offset & (cs - 1):
                    l1i = offset >> shift
                    held = tables.get(l1i)
                    if held is None:
                        held = tables[l1i] = self._l2_for_write(refs, l1i)
                    index = (offset >> cb) & l2_mask
                    entry = _U64.unpack_from(held[1], index * 8)[0]
                    if entry & in_place != q.OFLAG_COPIED or not entry & q.L2E_OFFSET_MASK:
                        lists = whole.get(l1i)
                        if lists is None:
                            lists = whole[l1i] = ([], [])
                            placed.append((held[1], *lists))
                        fresh.append((lists[0], index, mv))
                        if entry:
                            lists[1].append(entry)
                        continue
                for l1i, pos, table_end in mapping.spans(offset, offset + len(mv)):
                    held = tables.get(l1i)
                    if held is None:
                        held = tables[l1i] = self._l2_for_write(refs, l1i)
                    table = held[1]
                    piece = mv[pos - offset : table_end - offset]
                    updates, released, unplaced = await self._write_table(refs, table, pos, table_end, piece, blobs)
                    placed.append((table, updates, released))
                    for index, cluster in unplaced:
                        fresh.append((updates, index, cluster))
            if fresh:  # every piece's new clusters in one run: one ``pwritev`` for all their data
                start = refs.alloc(len(fresh), from_end=len(fresh) > 1)
                for k, (updates, index, cluster) in enumerate(fresh):
                    host = (start + k) << cb
                    writer.add(host, cluster)
                    updates.append((index, host | q.OFLAG_COPIED))
            writer.finish()
        except BaseException:
            writer.reset()
            raise
        for table, updates, _ in placed:
            for index, entry in updates:
                _U64.pack_into(table, index * 8, entry)
        for toff, table in tables.values():
            self._l2.mark_dirty(toff, table)
        for _, _, released in placed:
            for entry in released:
                self._release(refs, entry)

    async def _write_table(
        self,
        refs: Refcounts,
        table: bytearray,
        offset: int,
        end: int,
        mv: memoryview,
        blobs: dict[int, bytes] | None,
    ) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, memoryview | bytearray]]]:
        """Queue the data of ``mv`` (inside one L2 table) that goes where it is (in place, compressed)
        in the writer; returns the L2 updates to make once the data is written, the old entries to
        release, and the clusters that need a fresh host cluster (L2 index, data), which the caller
        allocates for all pieces at once."""
        cs, cb, zero_flag = self._cs, self._cb, self._zero_flag
        writer = self._writer
        updates: list[tuple[int, int]] = []  # (L2 index, new entry) once the data is written
        released: list[int] = []  # old entries whose clusters to release after the update
        fresh: list[tuple[int, memoryview | bytearray]] = []  # (L2 index, cluster data) to allocate
        pos = offset
        i = self.mapping.index(pos)
        while pos < end:
            in_off = pos & (cs - 1)
            n = min(cs - in_off, end - pos)
            src = mv[pos - offset : pos - offset + n]
            entry = _U64.unpack_from(table, i * 8)[0]
            host = entry & q.L2E_OFFSET_MASK
            if entry & q.OFLAG_COPIED and host and not entry & q.OFLAG_COMPRESSED:
                self._check_host(refs, host)
                if not entry & zero_flag:
                    writer.add(host + in_off, src)
                else:  # preallocated zero cluster: becomes data
                    if n == cs:
                        writer.add(host, src)
                    else:
                        buf = bytearray(cs)
                        buf[in_off : in_off + n] = src
                        writer.add(host, buf)
                    updates.append((i, host | q.OFLAG_COPIED))
            else:
                if n == cs:
                    cluster: memoryview | bytearray = src
                else:
                    cluster = await self._old_content(entry, pos - in_off)
                    cluster[in_off : in_off + n] = src
                released.append(entry)
                stored = False
                if self.compress:
                    blob = blobs.get(pos >> cb) if blobs is not None and n == cs else None
                    if blob is None:
                        blob = self._compress(cluster)
                    if len(blob) < cs:
                        at = self._alloc_bytes(refs, len(blob))
                        writer.add(at, blob)
                        updates.append((i, q.encode_compressed(at, len(blob), cb)))
                        stored = True
                if not stored:
                    fresh.append((i, cluster))
            pos += n
            i += 1
        return updates, released, fresh

    def _split(self, offset: int, length: int) -> tuple[list[tuple[int, int]], int, int]:
        """Partial head/tail pieces and the whole-cluster span; the image's last cluster counts as
        whole when the range reaches the end of the image."""
        cs, end = self._cs, offset + length
        whole_start = round_up(offset, cs)
        whole_end = round_down(end, cs) if end < self.header.size else round_up(end, cs)
        if whole_end <= whole_start:
            return [(offset, length)], 0, 0
        pieces = [(offset, whole_start - offset)] if whole_start > offset else []
        if end > whole_end:
            pieces.append((whole_end, end - whole_end))
        return pieces, whole_start, whole_end

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, write=True)
        if not length:
            return
        partial, whole_start, whole_end = self._split(offset, length)
        if fast and (partial or not self._zero_flag):
            raise OSError(errno.ENOTSUP, "fast zero needs whole clusters of a v3 qcow2 image")
        async with self._lock:
            self._check_open()
            for o, n in partial:
                await self._zero_partial(o, n)
            if whole_end > whole_start:
                await self._zero_clusters(whole_start, whole_end - whole_start, may_trim=may_trim)
            if fua:
                self._flush_locked()
        if self._backing_reads:
            await self._after_backing_reads(offset, length)

    async def _zero_partial(self, offset: int, length: int) -> None:
        if not await self._reads_zero(offset, length):
            await self._write(offset, memoryview(bytes(length)))

    async def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether the range already reads as zeroes without looking at data (zero/unallocated)."""
        for _, _, kind, _ in self.mapping.runs(offset, length, exact=False):
            if kind == DATA or (kind == UNALLOCATED and self.backing is not None and offset < self.backing.size):
                return False
        return True

    async def _zero_clusters(self, offset: int, length: int, *, may_trim: bool) -> None:
        """Whole clusters: v3 zero flags (no data written); v2 deallocation or zero data."""
        refs = self._begin_write()
        has_backing = self.backing is not None
        if not self._zero_flag and has_backing:
            zeros = memoryview(self._zero_cluster)
            for pos in range(offset, offset + length, self._cs):
                await self._write(pos, zeros)
            return
        for l1i, pos, table_end in self.mapping.spans(offset, offset + length):
            if not self._l1[l1i] & q.L1E_OFFSET_MASK and not has_backing:
                continue  # no L2 table and no backing: already reads as zeroes
            toff, table = self._l2_for_write(refs, l1i)
            for i in range(self.mapping.index(pos), self.mapping.index(table_end - 1) + 1):
                entry = _U64.unpack_from(table, i * 8)[0]
                host = entry & q.L2E_OFFSET_MASK
                if not self._zero_flag:  # v2 without backing: unallocated reads as zeroes
                    new = 0
                elif not may_trim and host and entry & q.OFLAG_COPIED and not entry & q.OFLAG_COMPRESSED:
                    new = host | q.OFLAG_COPIED | q.OFLAG_ZERO  # keep the allocation (no hole wanted)
                elif entry == 0 and not has_backing:
                    new = 0
                else:
                    new = q.OFLAG_ZERO
                if new != entry:
                    if not new & q.L2E_OFFSET_MASK:
                        self._release(refs, entry)
                    _U64.pack_into(table, i * 8, new)
            self._l2.mark_dirty(toff, table)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Whole clusters are deallocated (zero clusters over a backing file); partial ones are kept."""
        self._check(offset, length, write=True)
        _, whole_start, whole_end = self._split(offset, length)
        async with self._lock:
            self._check_open()
            if whole_end > whole_start and (self._zero_flag or self.backing is None):
                await self._zero_clusters(whole_start, whole_end - whole_start, may_trim=True)
            if fua:
                self._flush_locked()
        if self._backing_reads:
            await self._after_backing_reads(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch: loading the L2 tables is the useful part (the data is in the page cache's hands)."""
        self._check(offset, length)
        self.mapping.runs(offset, min(length, self._cs << 16), exact=False)

    # --- durability ------------------------------------------------------------------------------

    def _sync(self) -> None:
        """``fdatasync``, its failure latched (``FlushLatch``): every later flush (and FUA write)
        fails with EIO."""
        self._flush_latch.check()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._flush_latch.failed(exc)
            log.error("%s: flush failed, every later flush will fail: %s", self.path, exc)
            raise

    def _flush_locked(self) -> bool:
        """Whether it wrote refcount decrements after its sync (``close`` syncs them too)."""
        if self._flush_latch.error is not None:
            self._sync()  # raises the latched error
        self._write_metadata()
        self._sync()
        return self._release_quarantine()

    def _release_quarantine(self) -> bool:
        """The freeing of quarantined clusters is durable now: they may be reused, and their new
        refcounts may reach the file at any time (written now: the file counts what it references)."""
        refs = self._refs
        if refs is None or not refs.quarantined:
            return False
        freed, error = refs.release()
        for cluster in freed:
            if self._cbyte and cluster == (self._cbyte - 1) >> self._cb:
                self._cbyte = 0  # the compressed tail cluster was freed: never append to it again
            self._l2.discard(cluster << self._cb)
        refs.write_blocks()
        if error is not None:
            raise error
        return True

    def _write_metadata(self) -> None:
        """Write the cached metadata in QEMU's order, with syncs between the steps, so that whatever
        a crash keeps, nothing durable points to what is not durable yet:

        1. refcount blocks (they never count less than is referenced: a crash leaks at worst), the
           new L2 tables (nothing durable points to them yet), the file size; sync: these and the
           guest data written before are durable before anything points to them;
        2. a changed refcount table; for a moved one, sync, then the header; sync;
        3. the changed L2 tables and L1 entries (the caller's sync ends the flush).
        """
        refs = self._refs
        if refs is None or not self._marked_dirty:
            return
        self._l2.flush(new_only=True)
        refs.write_blocks()
        needed = refs.alloc_end << self._cb
        if os.lseek(self._fd, 0, os.SEEK_END) < needed:  # a block device is big enough or fails here
            os.ftruncate(self._fd, needed)
        l1_dirty = self._l1_dirty_hi >= self._l1_dirty_lo
        if not (l1_dirty or self._l2.dirty_count or refs.reftable_dirty or refs.header_dirty):
            return
        self._sync()
        if self._write_reftable(refs) and (l1_dirty or self._l2.dirty_count):
            self._sync()
        self._l2.flush()
        if l1_dirty:
            lo, hi = self._l1_dirty_lo, self._l1_dirty_hi + 1
            data = b"".join(_U64.pack(e) for e in self._l1[lo:hi])
            os.pwrite(self._fd, data, self.header.l1_table_offset + lo * 8)
            self._l1_dirty_lo, self._l1_dirty_hi = len(self._l1), -1

    def _write_reftable(self, refs: Refcounts) -> bool:
        """Step 2 of ``_write_metadata`` (its refcount blocks are durable); whether it wrote."""
        if not (refs.reftable_dirty or refs.header_dirty):
            return False
        refs.write_table()
        if refs.header_dirty:
            self._sync()
            self.header.refcount_table_offset = refs.reftable_offset
            self.header.refcount_table_clusters = refs.reftable_clusters
            os.pwrite(
                self._fd,
                q.REFTABLE_FIELDS_FAST.pack(refs.reftable_offset, refs.reftable_clusters),
                q.REFTABLE_FIELDS_OFFSET,
            )
            refs.header_dirty = False
        return True

    def _before_l2_evict(self) -> None:
        """A changed L2 table is about to be written early (cache eviction): what its entries
        point to, the data and its refcounts, becomes durable first (steps 1-2 of a flush). After
        a failed sync nothing written since is known durable and every flush fails: no ordering to
        keep, and reads that evict must not fail for it."""
        refs = self._refs
        assert refs is not None
        if self._flush_latch.error is not None:
            return
        refs.write_blocks()
        self._sync()
        if self._write_reftable(refs):
            self._sync()

    async def flush(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: device is closed")
        if self._read_only:
            return
        async with self._lock:
            self._check_open()
            self._flush_locked()

    async def close(self) -> None:
        """Flush, then clear the dirty bit: only now is the image complete and clean.

        The work runs in one task shared by every caller and shielded from their cancellation: a
        close given up on (a caller's timeout) while a write holds the lock must neither free the
        descriptor under that write (its data and metadata would land in whatever file reuses the
        number) nor stop half-way; it finishes, cleanly, once the write is done.
        """
        if self._closed:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
            self._closing.add_done_callback(_retrieve_close_error)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._closed:
            return
        try:
            if not self._read_only and (self._marked_dirty or self._bitmaps_for_close() is not None):
                async with self._lock:
                    if self._closed:
                        return  # abandon() ran while this one waited for the lock
                    bitmaps = self._bitmaps_for_close()
                    if bitmaps is not None:
                        self._store_bitmaps_locked(bitmaps)
                    if self._flush_locked():
                        self._sync()  # the refcounts of the clusters released just now, before "clean"
                    h = self.header
                    if h.version >= 3:
                        h.incompatible &= ~q.INCOMPAT_DIRTY
                        os.pwrite(
                            self._fd,
                            q.FEATURE_FIELDS_FAST.pack(h.incompatible, h.compatible, h.autoclear),
                            q.INCOMPAT_OFFSET,
                        )
                        self._sync()
        finally:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                if self.backing is not None and self._owns_backing:
                    await self.backing.close()

    def abandon(self) -> None:
        """Close without flushing or clearing the dirty bit (what a crash leaves; for tests/aborts)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)


async def _open_backing(
    name: str, fmt: str | None, image_path: str, chain: tuple[str, ...], check: BackingCheck | None = None
) -> BackingImage:
    """Open the backing file of ``image_path`` read-only, bottom-up; ``chain`` holds the real paths
    above it and ``check`` sees this file and every one below it."""
    path = locate_backing(name, image_path, chain, check)
    if fmt is None:
        fmt = probe_backing_format(path)
    if fmt == "qcow2":
        return await Qcow2Device.open(path, read_only=True, check_backing=check, _chain=chain)
    if fmt == "raw":
        return RawBacking(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    raise ImageFormatError(f"{image_path}: backing file format {fmt!r} is not supported (raw or qcow2)")


def _retrieve_close_error(task: asyncio.Future[None]) -> None:
    """A close whose callers all gave up still fails somewhere: log it rather than lose it."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a qcow2 image failed: %s", task.exception())


def _check_writable(h: ImageHeader, path: str, *, repair: bool) -> None:
    if h.incompatible & q.INCOMPAT_CORRUPT:
        raise ImageFormatError(f"{path}: image is marked corrupt; it can only be opened read-only")
    if h.incompatible & q.INCOMPAT_EXTL2:
        raise ImageFormatError(f"{path}: images with extended L2 entries (subclusters) can only be opened read-only")
    if h.incompatible & q.INCOMPAT_DIRTY and not repair:
        raise ImageFormatError(
            f"{path}: image was not cleanly closed ({incompatible_names(h.incompatible)} set): it may be an "
            "incomplete backup and its refcounts may be stale; open it read-only, or repair it with "
            "'qemu-img check -r all'"
        )
    if h.nb_snapshots:
        raise ImageFormatError(f"{path}: images with internal snapshots can only be opened read-only")
