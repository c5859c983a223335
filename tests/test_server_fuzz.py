"""The asyncio NBD server under the fuzzer of ``fuzz_nbd``: a few seeded examples on both event loops, over
TCP and unix sockets, memory and raw file devices, with and without device faults, some ending with the
server stopped under load — and checks that the fuzzer's oracles do catch a server that answers twice
or returns wrong data. Longer runs:
``bench/fuzz_server.py`` (``--seed`` replays a failure reported here)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fuzz_nbd import GOOD_REGION, MAX, FuzzConfig, FuzzDevice, FuzzFailure, fuzz
from sockkit import run_on

from nbd import server as nbd_server

CI = FuzzConfig(slots=3, connections=2, ops=40, region=1 << 20, max_length=256 << 10)
# Writes between 16 MiB and the maximum payload, which the server advertises and must take.
LARGE = FuzzConfig(slots=2, connections=1, ops=6, region=MAX + (1 << 20), large_writes=0.5, bad_handshakes=0)


def fuzzed(loop: str, cfg: FuzzConfig, seed: int, examples: int, *, reads: bool = True) -> None:
    """Run the fuzzer; a failure in one of its connections is raised as itself, not as a group.
    ``reads``: the run must have checked some read data against the shadow (the oracle did work)."""
    failures: list[BaseException] = []
    try:
        stats = run_on(loop, fuzz(cfg, seed, examples))
    except* FuzzFailure as group:
        failures.extend(group.exceptions)
    if failures:
        raise failures[0]
    assert stats.replies and stats.good_probes
    assert stats.verified_reads or not reads


@pytest.mark.parametrize(
    ("seed", "loop", "unix", "faults", "stop", "minimum"),
    [
        (1, "asyncio", False, 0.0, False, 1),
        (2, "uvloop", False, 0.0, True, 1),
        (3, "asyncio", True, 0.05, True, 1),
        (4, "uvloop", True, 0.0, False, 512),
    ],
)
def test_fuzz_server(seed: int, loop: str, unix: bool, faults: float, stop: bool, minimum: int) -> None:
    """``stop``: the run ends with ``NbdServer.stop`` while the connections of a last example run;
    ``minimum``: the export's minimum block size (unaligned requests must be refused)."""
    cfg = dataclasses.replace(CI, unix=unix, faults=faults, stop_under_load=stop, minimum=minimum)
    fuzzed(loop, cfg, seed, examples=6)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_fuzz_server_raw_file(loop: str) -> None:
    """Reads from a raw file go out by sendfile when the socket is free, and run in the I/O thread."""
    fuzzed(loop, dataclasses.replace(CI, raw=True, max_length=1 << 20, stop_under_load=loop == "uvloop"), 5, examples=2)


def test_fuzz_server_large_writes() -> None:
    fuzzed("asyncio", LARGE, 6, examples=1, reads=False)


def test_fuzzer_catches_a_second_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers a request twice (as writes over 16 MiB once were) fails the fuzzer."""
    send = nbd_server._Connection._send

    def twice(self: Any, data: bytes) -> None:
        send(self, data)
        send(self, data)

    monkeypatch.setattr(nbd_server._Connection, "_send", twice)
    with pytest.raises(FuzzFailure, match="unknown cookie"):
        fuzzed("asyncio", dataclasses.replace(CI, bad_handshakes=0), 7, examples=1)


def test_fuzzer_catches_wrong_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that returns one wrong byte on long reads (of the fuzz connections' regions) fails the
    fuzzer's shadow check."""
    pread = FuzzDevice.pread

    async def corrupt(self: FuzzDevice, offset: int, length: int) -> bytes:
        data = await pread(self, offset, length)
        if length >= 1024 and offset >= GOOD_REGION:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return data

    monkeypatch.setattr(FuzzDevice, "pread", corrupt)
    with pytest.raises(FuzzFailure, match="the shadow says"):
        fuzzed("asyncio", dataclasses.replace(CI, bad_handshakes=0), 8, examples=2)
