"""Timing kernels the way a decode step runs them: interleaved (every candidate sees the same machine state) and each
call on a weight copy out of cache (a step streams every layer's weights once)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per call of each function (median of `repeats`), called in turn so all see the same machine
    state; the first `warmup` rounds are not counted."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(repeats + warmup):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def copies_beyond_cache(weight_bytes: int, cache_bytes: int = 64 << 20) -> int:
    """How many copies of a weight to cycle through so that each timed call reads it from memory, as a decode
    step does (it streams every layer's weights once); one hot weight would time the cache instead. At most
    256 (tiny test models)."""
    return min(256, max(1, -(-cache_bytes // weight_bytes)))


def on_copies(copies: Iterator[T], call: Callable[[T], object]) -> Callable[[], object]:
    """A function to time: `call` on the next of `copies` (an `itertools.cycle` over a weight's copies). Candidates
    timed on the same copies share one cycle, so no call finds its weight in cache from the call before."""
    return lambda: call(next(copies))
