"""`idlm distill`: self-distillation data, the base model's own responses to a diverse prompt set.

The I-DLM learns to draft the continuations it will have to verify, so the targets are the base model's
own greedy (or sampled) outputs, generated with idlm's engine in batches, stored with their exact token ids.
Where the prompts come from: prompt_sources.py.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from idlm.training.prompt_sources import _jsonl

# ---- generation -----------------------------------------------------------------------------------
def prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class Generator:
    """Batched generation with idlm's engine around the pure base model (no adapter)."""

    def __init__(self, model: str, device: str | None, dtype: str | None, batch_size: int, max_len: int):
        from idlm.engine.llm import LLM

        self.llm = LLM(model, adapter="none", dtype=dtype, device=device,
                       kv_cache_tokens=batch_size * max_len + 256, max_num_seqs=batch_size)
        self.tokenizer = self.llm.tokenizer
        self.batch_size = batch_size

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.llm.apply_chat_template(messages)

    def _params(self, n: int, temperature: float, max_tokens: int, seed: int, top_p: float) -> list[Any]:
        from idlm.decoding.sampling import SamplingParams

        return [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                               seed=None if temperature == 0 else seed + i) for i in range(n)]

    def run(self, prompt_ids: list[list[int]], temperature: float, max_tokens: int, seed: int,
            top_p: float = 1.0) -> list[Any]:
        return self.llm.generate(prompt_ids, self._params(len(prompt_ids), temperature, max_tokens, seed, top_p),
                                 decoding="ar")

    def as_completed(self, prompt_ids: list[list[int]], temperature: float, max_tokens: int, seed: int,
                     top_p: float = 1.0) -> Iterator[tuple[int, Any]]:
        """(index, output) as each finishes, `batch_size` requests in flight the whole time."""
        return self.llm.as_completed(prompt_ids, self._params(len(prompt_ids), temperature, max_tokens, seed, top_p),
                                     decoding="ar")

    def texts(self, prompts: list[str], temperature: float, max_tokens: int) -> list[str]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = [self.chat_ids([{"role": "user", "content": p}]) for p in prompts[i : i + self.batch_size]]
            out.extend(s.text for s in self.run(chunk, temperature, max_tokens, seed=i, top_p=0.95))
        return out


def turn_key(users: list[str]) -> str:
    """The record key of the assistant turn that answers user turns `users` (a first turn: its prompt's key)."""
    return prompt_key(users[0] if len(users) == 1 else "\n\x1e".join(users))


def distill(
    gen: Generator,
    prompts: list[dict],
    out_path: str | Path,
    temperature: float = 0.0,
    max_tokens: int = 256,
    max_prompt_tokens: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the base model's response to every prompt and append one record per assistant turn to
    `out_path`. Multi-turn prompts ("turns": later user turns) run in rounds: round k answers user turn k
    in the conversation the earlier rounds wrote.
    Resumable: turns already in the file are skipped."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    if out.is_file():
        for rec in _jsonl(out):
            if "key" in rec:
                written[rec["key"]] = {"messages": rec.get("messages")}
    stats: dict[str, Any] = {"prompts": len(prompts), "already_done": 0, "written": 0, "skipped_long": 0,
                             "finished_eos": 0, "response_tokens": 0, "by_turn": {}}
    stats["already_done"] = sum(prompt_key(p["prompt"]) in written for p in prompts)
    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        for turn in range(max(1 + len(p.get("turns", [])) for p in prompts) if prompts else 0):
            items = []
            for p in prompts:
                users = [p["prompt"]] + list(p.get("turns", []))
                if turn >= len(users) or turn_key(users[: turn + 1]) in written:
                    continue
                if turn == 0:
                    history: list[dict[str, str]] = []
                else:
                    before = written.get(turn_key(users[:turn]))
                    if before is None:  # its earlier turn was skipped (too long)
                        continue
                    history = before["messages"]
                messages = history + [{"role": "user", "content": users[turn]}]
                ids = gen.chat_ids(messages)
                if len(ids) > max_prompt_tokens:
                    stats["skipped_long"] += 1
                    continue
                items.append((p, users[: turn + 1], messages, ids))
            if items:
                n = _generate_turn(gen, items, f, written, stats, temperature, max_tokens, seed, progress, turn, t0)
                stats["by_turn"][turn + 1] = n
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["tokens_per_second"] = round(stats["response_tokens"] / max(1e-9, stats["seconds"]), 1)
    return stats


def _generate_turn(gen: Generator, items: list[tuple], f: Any, written: dict[str, dict], stats: dict[str, Any],
                   temperature: float, max_tokens: int, seed: int, progress: bool, turn: int, t0: float) -> int:
    """Every item submitted at once: the engine keeps batch_size running (continuous batching) and each
    response is written as it finishes, so an interrupted run loses only the requests in flight."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), file=sys.stderr, disable=not progress, desc=f"distill turn {turn + 1}",
               unit="prompt")
    for i, s in gen.as_completed([ids for *_, ids in items], temperature, max_tokens, seed):
        p, users, messages, ids = items[i]
        rec = {
            "key": turn_key(users),
            "source": p.get("source"),
            "turn": turn + 1,
            "messages": messages + [{"role": "assistant", "content": s.text}],
            "prompt_ids": ids,
            "response_ids": list(s.token_ids),
            "finish_reason": s.finish_reason,
        }
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        written[rec["key"]] = {"messages": rec["messages"]}
        stats["written"] += 1
        stats["response_tokens"] += len(s.token_ids)
        stats["finished_eos"] += int(s.finish_reason == "stop")
        bar.update(1)
        bar.set_postfix(tok_s=f"{stats['response_tokens'] / max(1e-9, time.perf_counter() - t0):.0f}")
    bar.close()
    return len(items)


def manifest(out_path: str | Path, **settings: Any) -> dict[str, Any]:
    """What a distillation file holds, counted from the file itself (so it is right after any number of
    resumed runs): records, conversations, tokens and finish reasons by source and by turn, plus `settings`
    (the command, seed, limits) that regenerate it."""
    by_source: dict[str, dict[str, int]] = {}
    by_turn: dict[int, int] = {}
    total = {"records": 0, "prompt_tokens": 0, "response_tokens": 0, "finished_eos": 0}
    for rec in _jsonl(Path(out_path)):
        src = by_source.setdefault(str(rec.get("source")), {"records": 0, "response_tokens": 0})
        n = len(rec.get("response_ids", []))
        src["records"] += 1
        src["response_tokens"] += n
        turn = int(rec.get("turn", 1))
        by_turn[turn] = by_turn.get(turn, 0) + 1
        total["records"] += 1
        total["prompt_tokens"] += len(rec.get("prompt_ids", []))
        total["response_tokens"] += n
        total["finished_eos"] += int(rec.get("finish_reason") == "stop")
    return {"file": Path(out_path).name, **total, "by_turn": dict(sorted(by_turn.items())),
            "by_source": dict(sorted(by_source.items())), **settings}
