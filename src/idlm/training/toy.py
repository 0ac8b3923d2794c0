"""A toy language for smoke tests: counting in token ids (no tokenizer), with a deterministic continuation.

Tokens 0..39 are numbers (counting wraps around), 40 = BOS, 41 = EOS. A prompt is `BOS a a+k a+2k` with
k = 1 or 2; the response continues the count and ends with EOS. A model that learned it drafts perfectly,
so ISD at stride N should approach N tokens per forward.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = 40
BOS, EOS = 40, 41


def counting_records(n: int, seed: int, resp_len: tuple[int, int] = (16, 40)) -> list[dict]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, k = r.randrange(NUMBERS), r.choice([1, 2])
        seq = [(a + i * k) % NUMBERS for i in range(3 + r.randint(*resp_len))]
        out.append({"prompt_ids": [BOS] + seq[:3], "response_ids": seq[3:] + [EOS]})
    return out


def write_counting(path: str | Path, n: int = 1000, seed: int = 0, heldout: int = 8) -> None:
    """Training records at `path` and `heldout` prompts (other seed) at heldout.jsonl beside it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in counting_records(n, seed)))
    held = [{"prompt_ids": r["prompt_ids"]} for r in counting_records(heldout, seed + 1_000_003)]
    (p.parent / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
