"""``server.progress.Progress``: the terminal line (rate, ETA), the ``--progress=FD`` lines, and silence."""

from __future__ import annotations

import io
import os

from server.progress import Progress, human_bytes, human_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_duration(5) == "0:05"
    assert human_duration(3725) == "1:02:05"


def test_terminal_line_with_rate_and_eta() -> None:
    clock = Clock()
    out = io.StringIO()
    progress = Progress(1000 << 20, label="copy", stream=out, enabled=True, clock=clock)
    clock.now += 2
    progress.update(200 << 20)
    line = progress.line()
    assert line.startswith("copy [######")
    assert " 20% 200.0 MiB/1000.0 MiB 100.0 MiB/s ETA 0:08" in line
    assert out.getvalue().endswith(line)
    progress.finish()
    assert progress.percent == 100 and out.getvalue().endswith("\n")


def test_redraws_are_rate_limited() -> None:
    clock = Clock()
    out = io.StringIO()
    progress = Progress(100, stream=out, enabled=True, clock=clock)
    for done in range(1, 50):
        progress.update(done)
    assert out.getvalue().count("\r") == 1
    clock.now += 1
    progress.update(60)
    assert out.getvalue().count("\r") == 2


def test_fd_lines_like_nbdcopy() -> None:
    read_fd, write_fd = os.pipe()
    try:
        progress = Progress(1000, fd=write_fd)
        for done in (0, 5, 10, 11, 500, 999):
            progress.update(done)
        progress.finish()
        os.close(write_fd)
        write_fd = -1
        lines = os.read(read_fd, 4096).decode().splitlines()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    assert lines == ["0/100", "1/100", "50/100", "99/100", "100/100"]


def test_silent_when_not_a_tty_and_failed_finish_keeps_percent() -> None:
    out = io.StringIO()
    with Progress(100, stream=out) as progress:
        progress.advance(30)
    assert out.getvalue() == ""
    failed = Progress(100, stream=io.StringIO(), enabled=True)
    failed.update(30)
    failed.finish(ok=False)
    assert failed.percent == 30


def test_closed_fd_does_not_fail() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    progress = Progress(10, fd=write_fd)
    try:
        progress.update(5)  # EPIPE: dropped quietly
        progress.finish()
    finally:
        os.close(write_fd)


def test_progress_options_are_checked_while_parsing_and_shared() -> None:
    """``--progress[=FD]`` / ``--no-progress`` as copy, backup and repo all take them: a bad FD is an
    argument error, a bare flag a bar, ``--no-progress`` nothing."""
    import argparse

    import pytest

    from server.progress import add_progress_options, progress_from_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_progress_options(parser)
    with pytest.raises(argparse.ArgumentError, match="file descriptor number"):
        parser.parse_args(["--progress=abc"])
    assert progress_from_args(parser.parse_args(["--no-progress"]), 10, "x") is None
    bar = progress_from_args(parser.parse_args(["--progress"]), 10, "x")
    assert bar is not None and bar.total == 10
