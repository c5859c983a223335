"""``ClusterBitmap``: one bit per cluster, with run scanning done in C.

The backup engine keeps one bit per cluster that still has to be copied. At 64 KiB clusters a 2 TiB
disk needs 4 MiB, so the bits live in a ``bytearray`` (not a Python ``int``, which every update would
copy). Finding the next set or clear bit reads a window of the buffer as one little-endian integer
(``int.from_bytes``, C speed: bit ``k`` of the integer is bit ``k`` of the window) and takes its lowest
set bit; the window starts small (the next bit is usually a byte or two away) and doubles while it
finds nothing. A regular-expression search for the first byte that is not ``0x00`` ran at ~100 MB/s;
this runs at memory speed. A running population count makes "how much is left" O(1).

Bit ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``.
"""

from __future__ import annotations

from collections.abc import Iterator

_FIRST_WINDOW = 64  # bytes read by a search's first step (512 bits)
_MAX_WINDOW = 4096  # bytes per step once the search has widened


def _low_mask(bits: int) -> int:
    """A byte with the lowest ``bits`` bits set."""
    return (1 << bits) - 1


class ClusterBitmap:
    """A fixed-size bit array with range updates and next-set / next-clear searches."""

    __slots__ = ("_bits", "_count", "_size")

    def __init__(self, size: int, *, fill: bool = False) -> None:
        if size < 0:
            raise ValueError("bitmap size must not be negative")
        self._size = size
        nbytes = (size + 7) // 8
        self._bits = bytearray(b"\xff" * nbytes if fill else nbytes)
        self._count = 0
        if fill:
            self._count = size
            self._trim_tail()

    def _trim_tail(self) -> None:
        """Keep the bits past ``size`` clear so whole-byte searches never see them."""
        spare = self._size % 8
        if spare:
            self._bits[-1] &= _low_mask(spare)

    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        """How many bits are set."""
        return self._count

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> bool:
        if not 0 <= index < self._size:
            raise IndexError(index)
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._size:
            raise IndexError(f"bit range [{start}, {end}) outside [0, {self._size})")

    def _popcount(self, first_byte: int, end_byte: int) -> int:
        chunk = self._bits[first_byte:end_byte]
        return int.from_bytes(chunk, "little").bit_count() if chunk else 0

    def _update(self, start: int, end: int, value: bool) -> int:
        """Set or clear ``[start, end)``; returns how many bits changed."""
        self._check_range(start, end)
        if end - start == 1:  # one bit (a guest copy's granule): no popcount
            index, mask = start >> 3, 1 << (start & 7)
            old = self._bits[index]
            new = old | mask if value else old & ~mask
            if new == old:
                return 0
            self._bits[index] = new
            self._count += 1 if value else -1
            return 1
        if start == end:
            return 0
        first_byte, last_byte = start >> 3, (end - 1) >> 3
        before = self._popcount(first_byte, last_byte + 1)
        bits = self._bits
        head_mask = 0xFF & ~_low_mask(start & 7)
        tail_mask = _low_mask(((end - 1) & 7) + 1)
        if first_byte == last_byte:
            mask = head_mask & tail_mask
            bits[first_byte] = bits[first_byte] | mask if value else bits[first_byte] & ~mask
        else:
            bits[first_byte] = bits[first_byte] | head_mask if value else bits[first_byte] & ~head_mask
            bits[last_byte] = bits[last_byte] | tail_mask if value else bits[last_byte] & ~tail_mask
            middle = last_byte - first_byte - 1
            if middle:
                bits[first_byte + 1 : last_byte] = (b"\xff" if value else b"\x00") * middle
        after = self._popcount(first_byte, last_byte + 1)
        self._count += after - before
        return abs(after - before)

    def set_bit(self, index: int) -> None:
        """Set one bit: the common case of marking a small write, without the range machinery."""
        if not 0 <= index < self._size:
            raise IndexError(index)
        byte, mask = index >> 3, 1 << (index & 7)
        old = self._bits[byte]
        if not old & mask:
            self._bits[byte] = old | mask
            self._count += 1

    def set(self, start: int, end: int) -> int:
        """Set bits ``[start, end)``; returns how many were clear before."""
        return self._update(start, end, True)

    def clear(self, start: int, end: int) -> int:
        """Clear bits ``[start, end)``; returns how many were set before."""
        return self._update(start, end, False)

    def take(self, start: int, end: int) -> bool:
        """Clear ``[start, end)`` if every bit of it is set and say True; else change nothing and say
        False. A copy's claim: the test and the clear in one read and one write of the bytes."""
        self._check_range(start, end)
        if start == end:
            return True
        first_byte, end_byte = start >> 3, ((end - 1) >> 3) + 1
        bits = self._bits
        word = int.from_bytes(bits[first_byte:end_byte], "little")
        mask = ((1 << (end - start)) - 1) << (start & 7)
        if word & mask != mask:
            return False
        bits[first_byte:end_byte] = (word ^ mask).to_bytes(end_byte - first_byte, "little")
        self._count -= end - start
        return True

    def take_runs(self, start: int, end: int, budget: int, most: int) -> list[tuple[int, int]]:
        """Clear and return, in order, up to ``most`` runs ``(first, end)`` of set bits in ``[start,
        end)``, ``budget`` bits in all (the last run cut to fit): a batch of claims in one pass over
        the bytes, each window read as one integer whose runs are peeled off from its low end."""
        self._check_range(start, end)
        runs: list[tuple[int, int]] = []
        bits = self._bits
        end_byte = ((end - 1) >> 3) + 1 if end else 0
        pos, window = start, _FIRST_WINDOW
        while pos < end and budget > 0 and len(runs) < most:
            first_byte = pos >> 3
            stop_byte = min(first_byte + window, end_byte)
            window_end = min(stop_byte << 3, end)
            word = (int.from_bytes(bits[first_byte:stop_byte], "little") >> (pos & 7)) & ((1 << (window_end - pos)) - 1)
            base = pos
            while word:
                low = (word & -word).bit_length() - 1
                above = word >> low
                ones = (~above & (above + 1)).bit_length() - 1  # the run's length inside the window
                first = base + low
                stop = first + ones
                if stop >= window_end and stop < end:  # it may go on past the window
                    found = self._search(stop, end, False)
                    stop = end if found is None else found
                stop = min(stop, first + budget)
                runs.append((first, stop))
                budget -= stop - first
                pos = stop
                if budget <= 0 or len(runs) >= most or stop >= window_end:
                    break
                word = above >> ones
                base = stop
            else:
                pos = window_end
                window = min(window * 2, _MAX_WINDOW)
        for first, stop in runs:  # every bit of each run is set: flip them, no population count
            first_byte, end_byte = first >> 3, ((stop - 1) >> 3) + 1
            word = int.from_bytes(bits[first_byte:end_byte], "little")
            word ^= ((1 << (stop - first)) - 1) << (first & 7)
            bits[first_byte:end_byte] = word.to_bytes(end_byte - first_byte, "little")
            self._count -= stop - first
        return runs

    def count_range(self, start: int, end: int) -> int:
        """How many bits of ``[start, end)`` are set."""
        self._check_range(start, end)
        total = 0
        pos = start
        while pos < end:
            if pos & 7 or end - pos < 8:
                total += self[pos]
                pos += 1
                continue
            whole = (end - pos) >> 3
            total += self._popcount(pos >> 3, (pos >> 3) + whole)
            pos += whole << 3
        return total

    def _search(self, start: int, end: int, want: bool) -> int | None:
        """The first bit in ``[start, end)`` equal to ``want``, or None."""
        if start >= end:
            return None
        bits = self._bits
        pos = start >> 3
        end_byte = ((end - 1) >> 3) + 1
        window = _FIRST_WINDOW
        skip = start & 7  # bits of the first byte before ``start``
        while pos < end_byte:
            stop = min(pos + window, end_byte)
            word = int.from_bytes(bits[pos:stop], "little")
            if not want:
                word ^= (1 << ((stop - pos) << 3)) - 1
            if skip:
                word &= ~((1 << skip) - 1)
                skip = 0
            if word:
                found = (pos << 3) + (word & -word).bit_length() - 1
                return found if found < end else None
            pos = stop
            window = min(window * 2, _MAX_WINDOW)
        return None

    def next_set(self, start: int, end: int | None = None) -> int | None:
        """The first set bit in ``[start, end)``, or ``None``."""
        end = self._size if end is None else min(end, self._size)
        return self._search(max(start, 0), end, True)

    def next_clear(self, start: int, end: int | None = None) -> int | None:
        """The first clear bit in ``[start, end)``, or ``None``."""
        end = self._size if end is None else min(end, self._size)
        return self._search(max(start, 0), end, False)

    def run_end(self, start: int, end: int | None = None) -> int:
        """Where the run of equal bits that begins at ``start`` ends (bounded by ``end``)."""
        end = self._size if end is None else min(end, self._size)
        if start >= end:
            return end
        found = self._search(start, end, not self[start])
        return end if found is None else found

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield ``(first, end)`` of each run of set bits inside ``[start, end)``."""
        end = self._size if end is None else min(end, self._size)
        pos = start
        while True:
            first = self.next_set(pos, end)
            if first is None:
                return
            last = self.run_end(first, end)
            yield first, last
            pos = last

    def to_bytes(self) -> bytes:
        """The raw bits (for persistence and tests)."""
        return bytes(self._bits)

    @classmethod
    def from_bytes(cls, size: int, data: bytes | bytearray) -> ClusterBitmap:
        """A bitmap of ``size`` bits read from ``to_bytes`` output (short data: the rest clear; bits
        past ``size`` ignored)."""
        bitmap = cls(size)
        nbytes = len(bitmap._bits)
        chunk = bytes(data[:nbytes])
        bitmap._bits[: len(chunk)] = chunk
        bitmap._trim_tail()
        bitmap._count = bitmap._popcount(0, nbytes)
        return bitmap

    def __repr__(self) -> str:
        return f"ClusterBitmap(size={self._size}, count={self._count})"


__all__ = ["ClusterBitmap"]
