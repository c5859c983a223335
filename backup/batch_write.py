"""Many ``pwrite``s to one file in one system call: Linux AIO (``io_submit``) through ``ctypes``.

Why: a Python thread that writes for the event loop takes the GIL back after every system call, and
each time it does while the loop runs Python, the loop waits for the hand-back (a futex wake-up and a
reschedule) — measured as the guest losing most of its IOPS to a copy-before-write writer thread. A
``ctypes`` foreign call runs without the GIL, so a whole batch of writes costs the thread one GIL
round trip instead of one per write. For a file opened without ``O_DIRECT`` the kernel performs
buffered AIO writes synchronously inside ``io_submit``: nothing is left in flight when it returns,
and the completions are reaped at once.

No library is needed (the system calls are made through libc's ``syscall``); where the architecture's
numbers are not known, or the kernel refuses an AIO context (``ENOSYS``, ``fs.aio-max-nr`` reached),
``batch_writer`` falls back to a ``pwrite`` per piece.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Protocol

#: (io_setup, io_destroy, io_getevents, io_submit) by ``platform.machine()``.
_SYSCALLS: dict[str, tuple[int, int, int, int]] = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "arm64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
}
_IOCB_CMD_PWRITE = 1

#: A piece to write: (buffer address, length, file offset).
Piece = tuple[int, int, int]


class _Iocb(ctypes.Structure):
    """``struct iocb`` (little-endian layout: ``aio_key`` before ``aio_rw_flags``)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_uint32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


_IOCB_SIZE = ctypes.sizeof(_Iocb)
_BUF_OFFSET = _Iocb.aio_buf.offset  # aio_buf, aio_nbytes and aio_offset follow each other
_PACK_PIECE = struct.Struct("=QQq").pack_into
_EVENT = struct.Struct("=QQqq")  # struct io_event: data (our index), obj, res, res2
assert _Iocb.aio_nbytes.offset == _BUF_OFFSET + 8 and _Iocb.aio_offset.offset == _BUF_OFFSET + 16


class BatchWriter(Protocol):
    """Writes pieces of memory to one file descriptor; used by one thread at a time."""

    depth: int

    def write(self, pieces: list[Piece]) -> list[int]:
        """Write every piece (at most ``depth``); returns each one's result: the bytes written (possibly
        short) or ``-errno``."""
        ...

    def close(self) -> None: ...


def _pwrite_piece(fd: int, address: int, length: int, offset: int) -> int:
    """One piece with ``pwrite``: bytes written (short only at a failure) or ``-errno``."""
    view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
    done = 0
    try:
        while done < length:
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                break
            done += n
    except OSError as exc:
        return done if done else -(exc.errno or errno.EIO)
    return done


class PwriteWriter:
    """The fallback: one ``pwrite`` per piece."""

    def __init__(self, fd: int, depth: int) -> None:
        self.fd = fd
        self.depth = depth

    def write(self, pieces: list[Piece]) -> list[int]:
        return [_pwrite_piece(self.fd, address, length, offset) for address, length, offset in pieces]

    def close(self) -> None:
        pass


class AioWriter:
    """A kernel AIO context of ``depth`` slots writing to ``fd``; one ``io_submit`` per batch.

    The control blocks live in one buffer, filled per piece with a single ``struct.pack_into`` (the
    fields that never change — opcode, descriptor, the piece's index as its cookie — are set once), and
    the completions are read back with ``struct.iter_unpack``: the thread holds the GIL for about a
    microsecond per piece."""

    def __init__(self, fd: int, depth: int, numbers: tuple[int, int, int, int]) -> None:
        self.fd = fd
        self.depth = depth
        self._setup, self._destroy, self._getevents, self._submit = numbers
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(ctypes.c_long(self._setup), ctypes.c_uint(depth), ctypes.byref(self._ctx)) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"io_setup: {os.strerror(code)}")
        self._iocbs = (_Iocb * depth)()
        self._pointers = (ctypes.POINTER(_Iocb) * depth)()
        for index in range(depth):
            self._iocbs[index].aio_data = index
            self._iocbs[index].aio_lio_opcode = _IOCB_CMD_PWRITE
            self._iocbs[index].aio_fildes = fd
            self._pointers[index] = ctypes.pointer(self._iocbs[index])
        self._iocb_memory = memoryview(self._iocbs).cast("B")
        self._events = (ctypes.c_char * (_EVENT.size * depth))()
        self._event_memory = memoryview(self._events).cast("B")

    def write(self, pieces: list[Piece]) -> list[int]:
        count = len(pieces)
        if count > self.depth:
            raise ValueError(f"{count} pieces for an AIO context of {self.depth}")
        pack = _PACK_PIECE
        memory = self._iocb_memory
        at = _BUF_OFFSET
        for address, length, offset in pieces:
            pack(memory, at, address, length, offset)
            at += _IOCB_SIZE
        results = [-errno.EAGAIN] * count
        try:
            submitted = self._call(self._submit, self._ctx, ctypes.c_long(count), self._pointers)
        except OSError:
            submitted = 0  # every piece goes the slow way below, which reports its own error
        reaped = 0
        while reaped < submitted:
            got = self._call(
                self._getevents,
                self._ctx,
                ctypes.c_long(submitted - reaped),
                ctypes.c_long(self.depth),
                self._events,
                None,
            )
            for index, _obj, result, _result2 in _EVENT.iter_unpack(self._event_memory[: got * _EVENT.size]):
                results[index] = result
            reaped += got
        # Pieces io_submit did not take (a kernel may stop a batch early) go one by one.
        for index in range(submitted, count):
            results[index] = _pwrite_piece(self.fd, *pieces[index])
        return results

    def _call(self, number: int, *args: object) -> int:
        while True:
            result = int(self._syscall(ctypes.c_long(number), *args))
            if result >= 0:
                return result
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))

    def close(self) -> None:
        if self._ctx.value:
            self._syscall(ctypes.c_long(self._destroy), self._ctx)
            self._ctx = ctypes.c_ulong(0)


def batch_writer(fd: int, depth: int) -> BatchWriter:
    """An ``AioWriter`` where the kernel gives one, else a ``PwriteWriter``."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is not None:
        try:
            return AioWriter(fd, depth, numbers)
        except OSError:
            pass
    return PwriteWriter(fd, depth)


def buffer_address(buffer: bytearray) -> int:
    """The address of ``buffer``'s bytes (stable while a ``memoryview`` of it is alive: a bytearray
    with exports cannot be resized)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


__all__ = ["AioWriter", "BatchWriter", "Piece", "PwriteWriter", "batch_writer", "buffer_address"]
