"""Where the host runs this machine's CPUs right now: a probe timed beside every benchmark run.

A virtual machine's CPUs can be moved by its host between placements that last from seconds to minutes. On the
2-core EPYC VMs this project measures on, a product of two in-cache matrices on all torch threads takes either
about 91 us or about 101 us, switching every 10-60 s inside one process; in the slower placement the memory
bandwidth of both threads together is higher, and a compiled R-ISD int8 step takes 17 ms instead of 12.5 ms while
an AR step barely changes (docs/benchmarks.md). A ratio between two runs only means something when both saw
the same placement, so every timed run records the probe before and after it (`probe`), and summaries group
runs by the placement both probes agree on (`placements`).
"""
from __future__ import annotations

import statistics
import time

import torch


def probe(calls: int = 100, samples: int = 5) -> float:
    """Microseconds per in-cache product on all torch threads (median of `samples` batches of `calls`)."""
    x, w = torch.ones(128, 256), torch.ones(256, 256)  # 128 KB + 256 KB: in cache, so the probe times compute
    torch.mm(x, w)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(x, w)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(times), 2)


def placements(probes: list[tuple[float, float]], min_gap: float = 1.05) -> list[str]:
    """Each run's placement from its (before, after) probe times: "fast" or "slow" when both probes fall on
    one side of the widest relative gap among all probe times (if that gap exceeds `min_gap` and has at least a
    tenth of the times on each side, so one stray probe does not split the runs), "mixed" when they straddle it
    (the host moved the CPUs during the run), "one" for all runs when no such gap exists."""
    values = sorted(v for pair in probes for v in pair)
    least = max(1, len(values) // 10)
    gaps = [(values[i] / values[i - 1], (values[i - 1] + values[i]) / 2)
            for i in range(least, len(values) - least + 1) if values[i - 1] > 0]
    ratio, cut = max(gaps, default=(1.0, 0.0))
    if ratio < min_gap:
        return ["one"] * len(probes)
    return ["fast" if b < cut and a < cut else "slow" if b > cut and a > cut else "mixed" for b, a in probes]
