"""Acceptance of a model's own drafts: ISD (greedy or sampled) on held-out chat prompts, by draft position.

Used by `idlm acceptance` (any model: the untrained base, a converted model, base + adapter) and by the
trainer's periodic held-out evaluation. Definitions (decoding/stats.py): acceptance_by_position[j] =
accepted / tested drafts at block position j; introspective acceptance = mean over tested drafts of
min(1, p(x)/q(x)) (greedy: the share of drafts equal to argmax p); TPF = generated tokens / forwards.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from idlm.models.llama import CausalLM

HELDOUT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "heldout_prompts.jsonl"


class IdTokenizer:
    """Stand-in for models without a tokenizer: the engine's detokenizer only calls decode()."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ARG002
        return " ".join(str(int(i)) for i in ids)


def eval_prompt_records(path: str | None, tokenizer: Any, limit: int) -> list[tuple[dict, list[int]]]:
    """(record, prompt ids) from a JSONL of `{"messages": [...]}` (chat template applied), `{"prompt": text}` or
    `{"prompt_ids": [...]}`; `limit` records spread evenly over the file; records giving no ids are skipped."""
    from idlm.training.data import _ids, read_jsonl

    if path is None:
        path = str(HELDOUT_PROMPTS)
    recs = [rec for _, rec in read_jsonl(path)]
    if len(recs) > limit > 0:  # spread over the file (it mixes kinds of prompts in runs)
        recs = [recs[(i * len(recs)) // limit] for i in range(limit)]
    out = []
    for rec in recs:
        if "prompt_ids" in rec:
            out.append((rec, [int(t) for t in rec["prompt_ids"]]))
        elif tokenizer is not None and ("messages" in rec or "prompt" in rec):
            msgs = rec["messages"] if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]
            out.append((rec, _ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))))
    return out


def load_eval_prompts(path: str | None, tokenizer: Any, limit: int) -> list[list[int]]:
    """Prompt ids of `eval_prompt_records`."""
    return [ids for _, ids in eval_prompt_records(path, tokenizer, limit)]


def by_kind(per_prompt: list[dict[str, Any]], kinds: list[str | None]) -> dict[str, dict[str, Any]]:
    """TPF and acceptance by draft position over the prompts of each kind (ratios of sums, as the totals)."""
    from idlm.eval.paired import per_prompt_columns, ratio

    groups: dict[str, list[dict[str, Any]]] = {}
    for rec, kind in zip(per_prompt, kinds, strict=True):
        if kind is not None:
            groups.setdefault(str(kind), []).append(rec)
    out = {}
    for kind, recs in groups.items():
        c = per_prompt_columns(recs, max(len(r["proposed_by_position"]) for r in recs))
        out[kind] = {"prompts": len(recs),
                     "tokens_per_forward": round(float(ratio(c["generated"].sum(), c["forwards"].sum())), 4),
                     "acceptance_by_position": [round(float(a), 4)
                                                for a in ratio(c["accepted"].sum(0), c["tested"].sum(0))]}
    return out


def evaluate_isd(
    model: CausalLM,
    tokenizer: Any,
    eos_token_ids: list[int],
    prompts: list[list[int]],
    stride: int,
    max_tokens: int,
    lora: str,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """ISD over the prompts, batched through `LLM`: aggregate TPF and acceptance by draft position, and each
    prompt's counts (`per_prompt`, for eval/paired.py).
    lora: where the model's adapter acts (none | all | gated). temperature 0: greedy (acceptance = share of
    drafts equal to the argmax); above 0: exact drafting and the min(1, p/q) rule, prompt i seeded seed + i."""
    from idlm.decoding.policy import Decoding
    from idlm.decoding.sampling import SamplingParams
    from idlm.decoding.stats import RequestStats
    from idlm.engine.llm import LLM

    need = sum(len(p) + max_tokens + 4 * stride + 32 for p in prompts)
    llm = LLM.from_model(model, tokenizer if tokenizer is not None else IdTokenizer(), eos_token_ids,
                         kv_cache_tokens=need, max_num_seqs=max(1, len(prompts)))
    decoding = Decoding("risd" if lora == "gated" else "isd", stride, lora)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                 seed=None if temperature == 0 else seed + i) for i in range(len(prompts))]
        outs = llm.generate(prompts, params, decoding=decoding)
    finally:
        model.train(was_training)
    total = RequestStats(decoding=decoding.name, stride=stride)
    for o in outs:
        total.merge(o.stats)
    return {
        "stride": stride,
        "temperature": temperature,
        "prompts": len(prompts),
        "tokens_per_forward": round(total.tokens_per_forward, 4),
        "acceptance_by_position": [round(x, 4) for x in total.acceptance_by_position],
        "introspective_acceptance": round(total.introspective_acceptance, 4),
        "rounds": dict(total.rounds),
        "generated_tokens": total.generated_tokens,
        "seconds": round(time.perf_counter() - t0, 2),
        "per_prompt": [{"generated_tokens": o.stats.generated_tokens, "forwards": o.stats.forwards,
                        "proposed_by_position": list(o.stats.proposed_by_position),
                        "accepted_by_position": list(o.stats.accepted_by_position)} for o in outs],
    }
