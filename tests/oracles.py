"""Comparison helpers: token-for-token equality with a tolerance only at genuine near-ties, and sampled
continuations against the exact law of AR sampling."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import chisquare

from idlm.models.attention import DenseAttention

TIE_GAP = 1e-5


def top2_gap(model, ids: list[int]) -> float:
    """Gap between the two largest next-token logits after `ids` (our model, fp32, full forward)."""
    with torch.no_grad():
        h = model(torch.tensor([ids]), torch.arange(len(ids))[None], DenseAttention())
        top = torch.topk(model.logits(h[0, -1]).float(), 2).values
    return float(top[0] - top[1])


def assert_same_tokens(got: list[int], expected: list[int], prompt_ids: list[int], model, label: str = "") -> None:
    """Equal token for token; a first divergence passes only where the reference's top-2 gap < 1e-5."""
    n = min(len(got), len(expected))
    for i in range(n):
        if got[i] != expected[i]:
            gap = top2_gap(model, prompt_ids + expected[:i])
            print(f"{label}: first divergence at token {i}, reference top-2 logit gap {gap:.2e}")
            assert gap < TIE_GAP, f"{label}: tokens differ at {i} ({got[i]} vs {expected[i]}), top-2 gap {gap:.2e}"
            return
    assert len(got) == len(expected), f"{label}: lengths differ ({len(got)} vs {len(expected)})"


def assert_sampling_is_exact(decoding: Callable[[], object], n: int = 6000, temperature: float = 0.9) -> list:
    """Seeded sampling of `n` 3-token continuations of a tiny random model (vocab 12, so every cell of the joint
    is visited) through the engine with `decoding()` for each request: the counts of every marginal and pair
    must match the exact joint law built from the model's own conditionals (chi-square, p > 1e-3).
    Returns the finished sequences for further checks."""
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.eval.acceptance import IdTokenizer

    from conftest import tiny_model

    v = 12
    model = tiny_model(vocab_size=v, seed=3)
    prompt = [1, 5, 7]
    with torch.no_grad():
        def cond(prefix):
            h = model(torch.tensor([prompt + prefix]), torch.arange(len(prompt) + len(prefix))[None], DenseAttention())
            return torch.softmax(model.logits(h[0, -1]).double() / temperature, -1)

        p1 = cond([])
        joint = torch.zeros(v, v, v, dtype=torch.float64)
        for a in range(v):
            p2 = cond([a])
            for b in range(v):
                joint[a, b] = p1[a] * p2[b] * cond([a, b])
    engine = LLMEngine(model, IdTokenizer(), [], EngineConfig(kv_cache_tokens=65536, kv_block_size=8, max_num_seqs=256))
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=3, ignore_eos=True) for i in range(n)]
    seqs = [engine.add_request(prompt, sp, decoding()) for sp in params]
    engine.run_to_completion(seqs)
    counts = np.zeros((v, v, v))
    for s in seqs:
        counts[tuple(s.output_ids)] += 1
    for axes in ((1, 2), (0, 2), (0,), (1,)):
        got = counts.sum(axis=axes).reshape(-1)
        exp = joint.sum(dim=axes).reshape(-1).numpy() * n
        keep = exp > 5
        assert chisquare(got[keep], exp[keep] / exp[keep].sum() * got[keep].sum()).pvalue > 1e-3, axes
    return seqs
