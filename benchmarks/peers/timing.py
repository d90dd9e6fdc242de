"""Interleaved timing: every round runs every case once, the order rotated by one each round, so drift of the
machine (another process compiling, thermal, the allocator) hits all cases alike."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int,
                barrier: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every case, one list entry per round (in round order).

    ``warmup`` untimed calls of each case first. ``barrier`` (multi-rank) runs before every timed call, so
    the ranks start each call together. Python's garbage collector is off while timing (collected between
    calls, untimed).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            if barrier:
                barrier()
            cases[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                gc.collect()
                if barrier:
                    barrier()
                start = time.perf_counter()
                cases[name]()
                seconds[name].append(time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return seconds


def summary(seconds: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "max_ms": 1e3 * max(seconds), "rounds_ms": [1e3 * s for s in seconds]}
