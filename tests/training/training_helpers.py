"""Shared helpers for the training tests: a tiny random Llama and a counting language (token ids, no tokenizer)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from idlm.training.config import config_from_dict

NUMBERS = 40  # tokens 0..39 are numbers; counting wraps around
BOS, EOS = 40, 41
TINY_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 48,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "eos_token_id": EOS,
}


def counting_records(n: int, seed: int, resp_len=(16, 40)) -> list[dict]:
    """Prompt: BOS a a+k a+2k (k = 1 or 2); response: the count continued, then EOS."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, k = r.randrange(NUMBERS), r.choice([1, 2])
        seq = [(a + i * k) % NUMBERS for i in range(3 + r.randint(*resp_len))]
        out.append({"prompt_ids": [BOS] + seq[:3], "response_ids": seq[3:] + [EOS]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(tmp: Path, **over):
    data = write_jsonl(tmp / "train.jsonl", counting_records(400, seed=0))
    d = {
        "model": "random",
        "model_config": TINY_MODEL,
        "mode": "full",
        "block_size": 3,
        "alpha": 1.0,
        "data": {"train": [str(data)], "max_len": 64},
        "micro_batch_size": 4,
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 2,
        "device": "cpu",
        "output_dir": str(tmp / "run"),
        "save_every": 0,
        "progress": False,
        "eval": {"at_end": False},
    }
    for k, v in over.items():
        d[k] = v
    return config_from_dict(d)


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip() and "loss" in json.loads(l)]

