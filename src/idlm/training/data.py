"""Training data: chat / instruction JSONL -> token ids with the response marked, and a resumable order.

Accepted records (one JSON object per line):
- `{"prompt_ids": [...], "response_ids": [...]}`: exact token ids (what `idlm distill` writes; used as is);
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the last message must be the assistant's; everything
  before it is the prompt, rendered with the model's chat template and its generation prompt;
- `{"prompt": "...", "response": "..."}` (optional `"system"`): a one-turn chat.
Labels cover the assistant response up to and including its end-of-turn token; anything the template puts
after that token (e.g. a newline) is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from idlm.jsonl import read_jsonl

END_TOKEN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class TokenizedExample:
    ids: list[int]
    prompt_len: int

    @property
    def num_response(self) -> int:
        return len(self.ids) - self.prompt_len


class DataError(ValueError):
    """A training file or record that cannot be used, with where and why."""


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return [int(t) for t in x]


def end_token_ids(tokenizer: Any, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """Ids that end an assistant turn: the checkpoint's EOS ids plus known end-of-turn tokens."""
    out = [int(t) for t in eos_token_ids]
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            out.append(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        for name in END_TOKEN_NAMES:
            if name in vocab:
                out.append(int(vocab[name]))
    seen: list[int] = []
    for t in out:
        if t not in seen:
            seen.append(t)
    return seen


def record_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        if msgs[-1].get("role") != "assistant":
            raise DataError("the last message must have role 'assistant' (the response to train on)")
        if len(msgs) < 2:
            raise DataError("a conversation needs at least one message before the assistant's")
        return [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in msgs]
    if "prompt" in rec and "response" in rec:
        msgs = [{"role": "system", "content": str(rec["system"])}] if rec.get("system") else []
        return msgs + [
            {"role": "user", "content": str(rec["prompt"])},
            {"role": "assistant", "content": str(rec["response"])},
        ]
    raise DataError("record needs 'messages', 'prompt'+'response', or 'prompt_ids'+'response_ids'")


def tokenize_record(
    rec: dict[str, Any], tokenizer: Any, end_ids: list[int], max_len: int
) -> TokenizedExample | None:
    """Token ids and prompt length for one record; None when the prompt leaves no room for a response."""
    if "prompt_ids" in rec and "response_ids" in rec:
        prompt, resp = [int(t) for t in rec["prompt_ids"]], [int(t) for t in rec["response_ids"]]
    else:
        if tokenizer is None:
            raise DataError("text records need a tokenizer (the model has none)")
        msgs = record_messages(rec)
        prompt = _ids(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(msgs, tokenize=True))
        resp = None
        if full[: len(prompt)] == prompt:
            resp = full[len(prompt) :]
            cut = next((i for i, t in enumerate(resp) if t in end_ids), None)
            resp = resp[: cut + 1] if cut is not None else None
        if resp is None:  # template rewrites earlier turns, or names no end token: tokenize the text
            resp = _ids(tokenizer(msgs[-1]["content"], add_special_tokens=False)) + end_ids[:1]
    if len(prompt) + 1 >= max_len or not resp:
        return None
    ids = (prompt + resp)[:max_len]
    return TokenizedExample(ids, len(prompt))


def load_examples(
    paths: str | Path | list[str | Path],
    tokenizer: Any,
    eos_token_ids: Iterable[int] = (),
    max_len: int = 1024,
    min_response: int = 2,
) -> list[TokenizedExample]:
    """Read and tokenize every record of the given JSONL files (in file order)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    end_ids = end_token_ids(tokenizer, eos_token_ids)
    out: list[TokenizedExample] = []
    for path in paths:
        for n, rec in read_jsonl(path, DataError):
            try:
                ex = tokenize_record(rec, tokenizer, end_ids, max_len)
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            if ex is not None and ex.num_response >= min_response:
                out.append(ex)
    if not out:
        raise DataError(f"no usable training examples in {', '.join(map(str, paths))}")
    return out


class SampleOrder:
    """The global order of samples: a fresh seeded permutation per epoch, a pure function of the index.

    Resuming only needs the number of samples already consumed; every rank of a DDP job sees the same order
    and takes its own slice of each step's global batch.

    Grouped by length (shuffled orders; `sizes` a sortable size per sample, `group` samples a window, `chunk`
    samples a micro-batch): each window of the permutation is sorted by size and cut into chunks of `chunk`, whose
    order inside the window is shuffled again, so a micro-batch holds samples of about one size and pads little
    (each epoch is still every sample once).
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True,
                 sizes: list[Any] | None = None, group: int = 0, chunk: int = 1):
        if group and (sizes is None or len(sizes) != num_examples or chunk < 1 or group % chunk):
            raise ValueError("grouping by length needs every sample's size and a window of whole micro-batches")
        self.n, self.seed, self.shuffle = num_examples, seed, shuffle
        self.sizes, self.group, self.chunk = sizes, group, chunk
        self._epoch, self._perm = -1, None

    def __getitem__(self, index: int) -> int:
        epoch, i = divmod(index, self.n)
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
                if self.group:
                    self._perm = self._grouped(self._perm, g)
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm[i]

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        out: list[int] = []
        for w in range(0, len(perm), self.group):
            window = sorted(perm[w:w + self.group], key=lambda j: self.sizes[j])
            chunks = [window[c:c + self.chunk] for c in range(0, len(window), self.chunk)]
            for c in torch.randperm(len(chunks), generator=g).tolist():
                out += chunks[c]
        return out


def step_indices(step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int) -> list[int]:
    """Global sample indices that `rank` trains on at optimizer step `step`, micro-step `micro`."""
    base = step * micro_batch * accum * world + (micro * world + rank) * micro_batch
    return list(range(base, base + micro_batch))
