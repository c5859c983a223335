#!/usr/bin/env python3
"""Fuzz the asyncio NBD server for as long as asked (the harness is ``tests/fuzz_nbd.py``; CI runs a few
seeded examples of it in ``tests/test_server_fuzz.py``).

Each round is a fresh server fuzzed from one seed; the seed is printed before the round starts, so a
failure is replayed with ``--seed S --rounds 1`` (the same scripts are sent; timing may differ).

    .venv/bin/python bench/fuzz_server.py --minutes 10                # random seeds, both loops, all modes
    .venv/bin/python bench/fuzz_server.py --seed 1234 --rounds 1      # replay one round
    .venv/bin/python bench/fuzz_server.py --minutes 5 --large-writes 0.3 --region 34M
    .venv/bin/python bench/fuzz_server.py --rounds 50 --faults 0.05 --unix --loop uvloop

Exit status 1 on the first failure (its message names the seed, example and connection).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_nbd import FuzzConfig, FuzzFailure, fuzz


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def run_round(cfg: FuzzConfig, seed: int, examples: int, loop: str) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(fuzz(cfg, seed, examples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, help="stop starting rounds after this long")
    parser.add_argument("--rounds", type=int, help="number of rounds (default: until --minutes, else 20)")
    parser.add_argument("--seed", type=int, help="seed of the first round (later rounds: seed+1, ...)")
    parser.add_argument("--examples", type=int, default=5, help="examples per round (default 5)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--unix", action="store_true", help="unix socket only (default: alternate with TCP)")
    parser.add_argument("--tcp", action="store_true", help="TCP only")
    parser.add_argument("--raw", action="store_true", help="a raw file device (sendfile, I/O thread)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--connections", type=int, default=3)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--region", type=size, default=size("2M"))
    parser.add_argument("--max-length", type=size, default=size("1M"))
    parser.add_argument("--large-writes", type=float, default=0.0, help="share of writes over 16 MiB")
    parser.add_argument("--faults", type=float, default=None, help="share of device verbs that fail")
    parser.add_argument("--stall", type=float, default=0.2, help="longest read-side stall, seconds")
    parser.add_argument("--minimum", type=int, default=None, help="minimum block size (default: 1 or 512)")
    parser.add_argument(
        "--stop",
        choices=["alternate", "always", "never"],
        default="alternate",
        help="end rounds by stopping the server while connections run (default: every other round)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the server's log (refusals, injected bugs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    if args.large_writes and args.region < (32 << 20):
        parser.error("--large-writes needs --region of at least 32M")
    first = args.seed if args.seed is not None else random.randrange(1 << 32)
    rounds = args.rounds if args.rounds is not None else (None if args.minutes else 20)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    done = 0
    started = time.monotonic()
    while (rounds is None or done < rounds) and (deadline is None or time.monotonic() < deadline):
        seed = first + done
        loop = loops[done % len(loops)]
        unix = args.unix or (not args.tcp and done % 3 == 2)
        faults = args.faults if args.faults is not None else (0.05 if done % 4 == 3 else 0.0)
        cfg = FuzzConfig(
            slots=args.slots,
            connections=args.connections,
            ops=args.ops,
            region=args.region,
            max_length=args.max_length,
            large_writes=args.large_writes,
            stall=args.stall,
            faults=0.0 if args.raw else faults,
            unix=unix,
            raw=args.raw,
            stop_under_load=args.stop == "always" or (args.stop == "alternate" and done % 2 == 1),
            minimum=args.minimum if args.minimum is not None else (512 if done % 5 == 4 and not args.raw else 1),
        )
        where = "unix" if unix else "tcp"
        stops = "always" if cfg.stop_under_load else "never"
        replay = (
            f"--seed {seed} --rounds 1 --loop {loop} --{where} --faults {cfg.faults} --stop {stops}"
            f" --minimum {cfg.minimum}"
        )
        print(f"round {done}: {replay}", flush=True)
        t0 = time.monotonic()
        failures: list[BaseException] = []
        try:
            stats = run_round(cfg, seed, args.examples, loop)
        except* FuzzFailure as group:  # one slot's failure comes out of the TaskGroup in a group
            failures.extend(group.exceptions)
        if failures:
            print(f"FAILED (replay: {replay} and the same size options):")
            for exc in failures:
                print(exc)
            return 1
        print(f"  {time.monotonic() - t0:.1f} s: {stats}", flush=True)
        done += 1
    print(f"{done} rounds in {time.monotonic() - started:.0f} s without a failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
