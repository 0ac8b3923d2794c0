"""Teacher-forced first-draft agreement: what limits a gated adapter's first draft (`idlm first-draft`).

On the base model's own greedy answers (`idlm distill` records), cut into the training layout (blocks of
`draft_len`, response tokens MASKed; objective.build_gated_example), every row of draft index 0 (x0[i] the first
MASK of its block, target x0[i + 1]: the token after next) is predicted three ways:
- each adapter's MASK row (argmax), as in training and in ISD's first draft;
- a marginal oracle: argmax_y sum_k p(k | x0[<i]) p(y | x0[<i], k), k over x0[i] and the base model's `top_k - 1`
  likeliest others at row i - 1 (renormalised; objective.marginal_teacher, the soft target `soft_teacher:
  marginal` trains towards): hedging over the next token with the base model's own probabilities;
- the base model's clean row i, which knows x0[i]: on greedy answers it agrees on every row (an alignment check).
Rows are grouped by the base model's confidence in the skipped token x0[i] (its top probability at row i - 1).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise

import torch

from idlm.models.attention import KVRecorder, PrefixAttention
from idlm.models.llama import LORA_OFF, CausalLM
from idlm.training.objective import build_gated_example, marginal_teacher

CONFIDENCE_EDGES = (0.5, 0.8, 0.95)


@torch.no_grad()
def first_draft_rows(base: CausalLM, adapters: dict[str, CausalLM], examples: Iterable[tuple[Sequence[int], int]],
                     draft_len: int, top_k: int = 8) -> list[dict]:
    """One dict per draft-index-0 row of every (token ids, prompt length) example: target, confidence, and the
    predictions (`clean`, `marginal`, `drafts` by adapter name). `base` runs with its adapter off."""
    rows: list[dict] = []
    dev = next(base.parameters()).device
    for n, (ids, prompt_len) in enumerate(examples):
        ex = build_gated_example(ids, prompt_len, base.mask_token_id, draft_len)
        first = ex.task_mask & (ex.draft_index == 0) & (ex.noisy_positions >= 1)
        if not first.any():
            continue
        ids, first = ex.clean_ids.to(dev), first.to(dev)
        noisy_ids, noisy_pos = ex.noisy_ids.to(dev)[None], ex.noisy_positions.to(dev)
        pos, target = noisy_pos[first], ex.targets.to(dev)[first]
        clean = KVRecorder()
        probs = torch.softmax(base.logits(base(ids[None], torch.arange(len(ids), device=ids.device)[None], clean,
                                                LORA_OFF)[0]).float(), -1)
        confidence = probs[pos - 1].max(-1).values
        marginal = marginal_teacher(base, clean, probs[pos - 1], probs[pos], ids[pos], torch.zeros_like(pos), pos,
                                    top_k).argmax(-1)
        drafts = {}
        for name, model in adapters.items():
            gate = (noisy_ids == model.mask_token_id).float()
            hidden = model(noisy_ids, noisy_pos[None], PrefixAttention(clean.kv, ex.noisy_mask.to(dev)[None, None]),
                           gate)[0]
            drafts[name] = model.logits(hidden[first]).argmax(-1).tolist()
        clean_pred = probs[pos].argmax(-1).tolist()
        for j in range(len(pos)):
            rows.append({"example": n, "position": int(pos[j]), "target": int(target[j]),
                         "confidence": float(confidence[j]), "clean": clean_pred[j], "marginal": int(marginal[j]),
                         "drafts": {name: d[j] for name, d in drafts.items()}})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Agreement with the target: overall and by the skipped token's confidence."""
    names = sorted(rows[0]["drafts"]) if rows else []

    def agreement(group: list[dict]) -> dict:
        def share(pick) -> float:
            return sum(pick(r) == r["target"] for r in group) / len(group)

        return {"rows": len(group), "clean": share(lambda r: r["clean"]), "marginal": share(lambda r: r["marginal"]),
                "drafts": {name: share(lambda r, name=name: r["drafts"][name]) for name in names}}

    if not rows:
        return {"rows": 0, "by_confidence": []}
    edges = (0.0, *CONFIDENCE_EDGES, float("inf"))
    groups = [([r for r in rows if lo <= r["confidence"] < hi], lo, min(hi, 1.0)) for lo, hi in pairwise(edges)]
    return {**agreement(rows), "by_confidence": [{"confidence": [lo, hi], "share": len(g) / len(rows), **agreement(g)}
                                                 for g, lo, hi in groups if g]}
