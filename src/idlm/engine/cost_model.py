"""The cost model: seconds of one forward by batch size and step layout, measured on this machine.

A layout is what one sequence feeds in a step: AR (1 row), an ISD cold round (1 + M rows) or verify round
(1 + K + M (1 + B) rows, MASK rows through the gated adapter). Times are medians over repeats of real
forwards through the engine's runner (sequences with a cached prefix of `context` tokens, kv blocks taken
from and given back to the engine's block manager). Measurements are cached in $IDLM_CACHE/cost/ under a
key naming the machine (CPU, capability, threads), torch, the model, dtype, adapter and device, so a
later start on the same setup reads them instead of measuring.

Combined with the round model (decoding/round_model.py) it predicts the speed of a decoding relative to AR
at a given batch size: TPF / (time of its average forward / time of an AR forward).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from idlm.decoding.policy import Decoding, StepPlan
from idlm.decoding.round_model import estimate
from idlm.engine.model_runner import RunnerInput


def machine_key() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def layouts(decoding: Decoding, mask_token_id: int) -> dict[str, StepPlan]:
    """The step plans of one sequence under `decoding`: AR, or its cold and verify rounds."""
    if decoding.num_masks == 0:
        return {"ar": decoding.plan([1], [], mask_token_id)}
    k = decoding.num_masks
    return {"cold": decoding.plan([1], [], mask_token_id), "verify": decoding.plan([1], [2] * k, mask_token_id)}


@dataclass
class CostModel:
    """seconds[layout name][batch] of one forward; layout names come from `layout_name`."""

    key: dict[str, Any]
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)

    @staticmethod
    def layout_name(plan: StepPlan) -> str:
        gated = sum(plan.lora_gate)
        return f"rows{len(plan.token_ids)}-gated{gated}-logits{plan.num_logits}"

    def time(self, plan: StepPlan, batch: int) -> float:
        """Seconds of a forward of `batch` sequences with this plan (linear in batch between measured sizes)."""
        by_batch = self.seconds[self.layout_name(plan)]
        sizes = sorted(by_batch)
        if batch in by_batch:
            return by_batch[batch]
        lo = max([b for b in sizes if b < batch], default=sizes[0])
        hi = min([b for b in sizes if b > batch], default=sizes[-1])
        if lo == hi:
            return by_batch[lo] * batch / lo
        w = (batch - lo) / (hi - lo)
        return by_batch[lo] * (1 - w) + by_batch[hi] * w

    def speedup(self, decoding: Decoding, acceptance: list[float], batch: int, mask_token_id: int) -> float:
        """Predicted tokens/s of `decoding` over AR's at this batch size (every sequence decoding alike)."""
        ar = Decoding()
        t_ar = self.time(layouts(ar, mask_token_id)["ar"], batch)
        if decoding.num_masks == 0:
            return 1.0
        plans = layouts(decoding, mask_token_id)
        e = estimate(acceptance, decoding.stride, decoding.branches)
        per_forward = (1 - e.cold_share) * self.time(plans["verify"], batch) + e.cold_share * self.time(
            plans["cold"], batch)
        return e.tokens_per_forward / (per_forward / t_ar)

    # ---- persistence ---------------------------------------------------------------------------
    def path(self, root: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        return root / "cost" / f"{digest}.json"

    def save(self, root: Path) -> Path:
        p = self.path(root)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": self.key, "seconds": self.seconds}, indent=1))
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, root: Path, key: dict[str, Any]) -> "CostModel | None":
        p = cls(key).path(root)
        if not p.is_file():
            return None
        d = json.loads(p.read_text())
        if d.get("key") != key:
            return None
        return cls(key, {name: {int(b): s for b, s in v.items()} for name, v in d["seconds"].items()})


def measure(engine: Any, decodings: list[Decoding], batches: list[int], context: int = 128, repeats: int = 5,
            key: dict[str, Any] | None = None) -> CostModel:
    """Time real forwards of every layout of `decodings` (and AR) at each batch size through the engine's runner.
    Needs kv blocks for max(batches) sequences of context + the largest step; the engine should be idle."""
    mask = engine.model.mask_token_id
    plans: dict[str, StepPlan] = {}
    for d in [Decoding()] + list(decodings):
        for plan in layouts(d, mask).values():
            plans[CostModel.layout_name(plan)] = plan
    model = CostModel(key or {})
    blocks = engine.blocks
    tables: list[list[int]] = []
    try:
        longest = max(len(p.token_ids) for p in plans.values())
        for _ in range(max(batches)):
            t: list[int] = []
            if not blocks.grow(t, context + longest):
                raise ValueError(f"the KV pool cannot hold {max(batches)} x {context + longest} tokens to measure")
            tables.append(t)
        for name, plan in plans.items():
            model.seconds[name] = {}
            for b in batches:
                inputs = [RunnerInput(tables[i], context, plan) for i in range(b)]
                times = []
                for r in range(repeats + 1):
                    t0 = time.perf_counter()
                    engine.runner.run(inputs)
                    if torch.cuda.is_available() and str(engine.device).startswith("cuda"):
                        torch.cuda.synchronize()
                    if r:  # the first is a warm-up
                        times.append(time.perf_counter() - t0)
                model.seconds[name][b] = statistics.median(times)
    finally:
        for t in tables:
            blocks.free(t)
    return model
