"""A progress display for long copies: a bar with rate and ETA on a terminal, or machine-readable lines.

Used by ``nbd-backup copy``, ``backup`` and ``repo``; ``add_progress_options`` and ``progress_from_args``
give them the same ``--progress[=FD]`` / ``--no-progress`` options. Three outputs, chosen by the caller:

* a terminal (``stream`` is a tty): one redrawn line, ``[#####-----]  42% 1.2 GiB/3.0 GiB 310 MiB/s ETA 0:06``;
* ``fd=N`` (``--progress=FD``): a line ``P/100`` each time the whole percentage changes — the format of
  ``nbdcopy --progress=FD``, so tools that read one read the other;
* nothing (not a tty, no fd).

Redraws are rate-limited, so calling :meth:`Progress.update` per request is cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_REDRAW_INTERVAL = 0.1
_RATE_WINDOW = 3.0


def human_bytes(value: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Track ``done`` out of ``total`` bytes and show it; ``finish()`` prints the final state."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        fd: int | None = None,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.label = label
        self._fd = fd
        self._stream = stream if stream is not None else sys.stderr
        self._tty = (enabled if enabled is not None else _isatty(self._stream)) and fd is None
        self._width = width
        self._clock = clock
        self._start = clock()
        self._last_draw = float("-inf")
        self._last_percent = -1
        self._samples: list[tuple[float, int]] = [(self._start, 0)]
        self._finished = False

    # -- feeding

    def set_total(self, total: int) -> None:
        self.total = max(total, 0)
        self._emit(force=False)

    def advance(self, nbytes: int) -> None:
        self.update(self.done + nbytes)

    def update(self, done: int) -> None:
        self.done = done
        now = self._clock()
        samples = self._samples
        if now - samples[-1][0] >= _REDRAW_INTERVAL:
            samples.append((now, done))
            while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW:
                samples.pop(0)
        self._emit(force=False)

    def finish(self, *, ok: bool = True) -> None:
        """Draw the final state (100 % on success) and end the terminal line."""
        if self._finished:
            return
        self._finished = True
        if ok:
            self.done = max(self.done, self.total)
        self._emit(force=True)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.finish(ok=exc_type is None)

    # -- derived values

    @property
    def percent(self) -> int:
        if self.total <= 0:
            return 100 if self._finished else 0
        return min(100, self.done * 100 // self.total)

    @property
    def rate(self) -> float:
        """Bytes per second over the last few seconds (the whole run at first)."""
        now = self._clock()
        first_time, first_done = self._samples[0]
        elapsed = now - first_time
        if elapsed <= 0:
            return 0.0
        return (self.done - first_done) / elapsed

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def eta(self) -> float | None:
        rate = self.rate
        if rate <= 0 or self.total <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self) -> str:
        """The terminal line (without the carriage return)."""
        filled = self._width * self.percent // 100
        bar = "#" * filled + "-" * (self._width - filled)
        label = f"{self.label} " if self.label else ""
        eta = self.eta()
        if self._finished:
            tail = f"in {human_duration(self.elapsed)}"
        else:
            tail = f"ETA {human_duration(eta)}" if eta is not None else "ETA --:--"
        return (
            f"{label}[{bar}] {self.percent:3d}% {human_bytes(self.done)}/{human_bytes(self.total)} "
            f"{human_bytes(self.rate)}/s {tail}"
        )

    # -- output

    def _emit(self, *, force: bool) -> None:
        if self._fd is not None:
            percent = self.percent
            if percent != self._last_percent:
                self._last_percent = percent
                try:
                    os.write(self._fd, f"{percent}/100\n".encode())
                except OSError:
                    self._fd = None  # the reader went away: progress is not worth failing the copy for
            return
        if not self._tty:
            return
        now = self._clock()
        if not force and now - self._last_draw < _REDRAW_INTERVAL:
            return
        self._last_draw = now
        self._stream.write("\r\x1b[K" + self.line())
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_target(text: str) -> str:
    """``--progress``'s value: ``tty`` (the bare flag) or a file descriptor number, checked while parsing."""
    if text != "tty" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"needs a file descriptor number, not {text!r}")
    return text


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """``--progress[=FD]`` and ``--no-progress``, as ``nbdcopy`` spells them."""
    parser.add_argument(
        "--progress",
        nargs="?",
        const="tty",
        default=None,
        type=_progress_target,
        metavar="FD",
        help="show a progress bar; --progress=FD writes 'N/100' lines to file descriptor FD instead",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show progress, even on a terminal")


def progress_from_args(args: argparse.Namespace, total: int, label: str) -> Progress | None:
    """The display those options ask for: none, lines on a descriptor, or a bar (on a terminal, or always
    with a bare ``--progress``)."""
    if args.no_progress:
        return None
    if args.progress not in (None, "tty"):
        return Progress(total, fd=int(args.progress))
    return Progress(total, label=label, enabled=True if args.progress == "tty" else None)
