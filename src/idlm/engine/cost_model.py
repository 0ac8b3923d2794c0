"""The cost model: seconds of one step by batch size and step layout, measured on this machine.

A layout is what one sequence feeds in a step: AR (1 row), an ISD cold round (1 + M rows) or verify round
(1 + K + M (1 + B) + k - 1 rows, MASK rows through the gated adapter). Times are medians over interleaved
repeats of real steps: the engine runner's forward (sequences with a cached prefix of `context` tokens, kv
blocks taken from and given back to the engine's block manager) and the decoder's greedy work on its logits
(verifying, drafting: about 1 ms a sequence for an R-ISD step, 0.2 ms for AR, on the 2-core CPU).
Measurements are cached in $IDLM_CACHE/cost/ under a key naming the machine (CPU, capability, threads),
torch, the model, dtype, adapter and device, so a later start on the same setup reads them instead of
measuring.

Combined with the round model (decoding/round_model.py) it predicts the speed of a decoding relative to AR
at a given batch size: TPF / (time of its average step / time of an AR step).
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idlm.decoding.decoder import DecodeItem
from idlm.decoding.policy import Decoding, StepPlan
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.round_model import estimate
from idlm.engine.machine_cache import load_record, save_record
from idlm.engine.model_runner import RunnerInput


CONTEXT = 128  # cached tokens per sequence in a measured step


@dataclass(frozen=True)
class StepFit:
    """A step's seconds as a linear function of what it feeds:

        seconds = fixed + batch * (per_seq + per_row * rows + per_gated * gated + per_logit * logits)

    with rows, gated (adapter) rows and logit rows per sequence. `fixed` is what a step costs whatever it feeds
    (reading the weights: memory-bound); the per-row terms are the compute. Fitted by least squares on relative
    error to measured steps, it predicts layouts and batch sizes that were not measured."""

    fixed: float
    per_seq: float
    per_row: float
    per_gated: float
    per_logit: float

    def seconds(self, batch: int, rows: int, gated: int, logits: int) -> float:
        return self.fixed + batch * (self.per_seq + self.per_row * rows + self.per_gated * gated
                                     + self.per_logit * logits)

    @property
    def boundary_rows(self) -> float:
        """Rows per step at which their compute equals the fixed cost: below it a step is memory-bound (more
        rows are nearly free), above it compute-bound (time grows with every row)."""
        return self.fixed / max(self.per_row, 1e-12)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, int, float]]) -> "StepFit":
        """samples: (batch, rows, gated, logits, seconds); needs at least 5 that are not collinear."""
        if len(samples) < 5:
            raise ValueError(f"a step fit needs at least 5 measured steps, got {len(samples)}")
        x = np.array([[1.0, b, b * r, b * g, b * l] for b, r, g, l, _ in samples])
        y = np.array([t for *_, t in samples])
        coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)  # relative error
        return cls(*(float(c) for c in coef))


def layout_features(name: str) -> tuple[int, int, int]:
    """(rows, gated, logits) per sequence of a layout name (`CostModel.layout_name`)."""
    m = re.fullmatch(r"rows(\d+)-gated(\d+)-logits(\d+)", name)
    if m is None:
        raise ValueError(f"not a layout name: {name!r}")
    return int(m[1]), int(m[2]), int(m[3])


@dataclass
class CostModel:
    """seconds[layout name][batch] of one step; layout names come from `layout_name`."""

    key: dict[str, Any]
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    _fit: StepFit | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def layout_name(plan: StepPlan) -> str:
        gated = sum(plan.lora_gate)
        return f"rows{len(plan.token_ids)}-gated{gated}-logits{plan.num_logits}"

    def fit(self) -> StepFit:
        """The step fit of the measured steps (computed once: a cost model is complete when measured or loaded)."""
        if self._fit is None:
            self._fit = StepFit.fit([(b, *layout_features(name), t) for name, by_batch in self.seconds.items()
                                     for b, t in by_batch.items()])
        return self._fit

    def time(self, plan: StepPlan, batch: int) -> float:
        """Seconds of a step of `batch` sequences with this plan: measured (linear in batch between measured
        sizes, proportional beyond), or from the fit when this layout was not measured."""
        name = self.layout_name(plan)
        if name not in self.seconds:
            return self.fit().seconds(batch, *layout_features(name))
        by_batch = self.seconds[name]
        sizes = sorted(by_batch)
        if batch in by_batch:
            return by_batch[batch]
        lo = max([b for b in sizes if b < batch], default=sizes[0])
        hi = min([b for b in sizes if b > batch], default=sizes[-1])
        if lo == hi:
            return by_batch[lo] * batch / lo
        w = (batch - lo) / (hi - lo)
        return by_batch[lo] * (1 - w) + by_batch[hi] * w

    def round_seconds(self, decoding: Decoding, batch: int, mask_token_id: int) -> tuple[float, float]:
        """(verify, cold) round seconds of `batch` sequences under `decoding` (AR: its step, twice)."""
        plans = decoding.layouts(mask_token_id)
        if "ar" in plans:
            t = self.time(plans["ar"], batch)
            return t, t
        return self.time(plans["verify"], batch), self.time(plans["cold"], batch)

    def speedup(self, decoding: Decoding, acceptance: list[float], batch: int, mask_token_id: int) -> float:
        """Predicted tokens/s of `decoding` over AR's at this batch size (every sequence decoding alike)."""
        if decoding.num_masks == 0:
            return 1.0
        t_ar = self.round_seconds(Decoding(), batch, mask_token_id)[0]
        e = estimate(acceptance, decoding.stride, decoding.branches)
        return e.speedup(*self.round_seconds(decoding, batch, mask_token_id), t_ar)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, root: Path) -> Path:
        return save_record(root, "cost", self.key, self.seconds)

    @classmethod
    def load(cls, root: Path, key: dict[str, Any]) -> "CostModel | None":
        seconds = load_record(root, "cost", key)
        if seconds is None:
            return None
        return cls(key, {name: {int(b): s for b, s in v.items()} for name, v in seconds.items()})


def measure(engine: Any, decodings: list[Decoding], batches: list[int], context: int = CONTEXT, repeats: int = 5,
            key: dict[str, Any] | None = None, max_rows: int | None = None) -> CostModel:
    """Time real steps of every layout of `decodings` (and AR) at each batch size: the engine runner's forward and
    the decoder's greedy verify / sample / draft on its logits. Steps of more than `max_rows` rows are skipped
    (the fit predicts them). Needs kv blocks for max(batches) sequences of context + the largest step and
    max(batches) decoder slots; the engine should be idle."""
    mask = engine.model.mask_token_id
    steps: dict[str, tuple[Decoding, StepPlan, list[int]]] = {}  # layout name -> (decoding, plan, drafts)
    for d in [Decoding()] + list(decodings):
        for kind, plan in d.layouts(mask).items():
            steps[CostModel.layout_name(plan)] = (d, plan, [2] * d.num_masks if kind == "verify" else [])
    model = CostModel(key or {})
    blocks = engine.blocks
    tables: list[list[int]] = []
    greedy = SamplingParams(temperature=0.0)
    try:
        longest = max(len(plan.token_ids) for _, plan, _ in steps.values())
        for _ in range(max(batches)):
            t: list[int] = []
            if not blocks.grow(t, context + longest):
                raise ValueError(f"the KV pool cannot hold {max(batches)} x {context + longest} tokens to measure")
            tables.append(t)
        runs = []  # (name, batch, runner inputs, decode items)
        for name, (d, plan, drafts) in steps.items():
            nb = d.num_branches(len(drafts)) if d.num_masks else 0
            alternatives = [3] * (d.tree - 1) if drafts else []
            for b in batches:
                if max_rows is not None and b > 1 and b * len(plan.token_ids) > max_rows:
                    continue
                runs.append((name, b, [RunnerInput(tables[i], context, plan) for i in range(b)],
                             [DecodeItem(i, i, greedy, d, 0, context + 1, drafts, 1 << 20, nb, alternatives)
                              for i in range(b)]))
        # Rounds interleave the layouts (machine noise spreads evenly), smallest step first: a small step timed
        # right after a big one pays for the big one's freed memory (+10% seen at batch 1 on the 2-core CPU), so
        # each round starts with two untimed small steps; round 0 warms everything up.
        runs.sort(key=lambda run: (run[1], len(run[2][0].plan.token_ids)))

        def step(inputs, items) -> float:
            t0 = time.perf_counter()
            logits, hidden = engine.runner.run(inputs)
            engine.decoder.decode(items, logits, hidden, engine.runner.head)
            if torch.cuda.is_available() and str(engine.device).startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        times: dict[tuple[str, int], list[float]] = {}
        for r in range(repeats + 1):
            step(*runs[0][2:])
            step(*runs[0][2:])
            for name, b, inputs, items in runs:
                seconds = step(inputs, items)
                if r:
                    times.setdefault((name, b), []).append(seconds)
        for (name, b), ts in times.items():
            model.seconds.setdefault(name, {})[b] = statistics.median(ts)
    finally:
        for t in tables:
            blocks.free(t)
    return model
