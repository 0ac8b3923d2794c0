"""Shared helpers for the training tests: a tiny random Llama and a counting language (token ids, no tokenizer)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from idlm.training.config import config_from_dict

from idlm.training.toy import BOS, EOS, NUMBERS, counting_records  # noqa: F401

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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(tmp: Path, **over):
    data = write_jsonl(tmp / "train.jsonl", counting_records(400, seed=0))
    d = {
        "model": "random",
        "model_config": TINY_MODEL,
        "mode": "full",
        "draft_len": 3,
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


WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "there", "hello", "how",
         "are", "you", "?", "!", "be", "nice"]
V = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer():
    tok = Tokenizer(models.WordLevel(dict(V), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return t


@contextlib.contextmanager
def one_thread():
    """Tiny models train 3x faster on one thread than on two contended ones (shared 2-core machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
