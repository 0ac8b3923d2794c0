"""decoding/decoder.py: the greedy argmax path gives what the general (distribution) path gives."""
from __future__ import annotations

import random

import pytest
import torch

from idlm.decoding import decoder as decoder_module
from idlm.decoding.decoder import DecodeItem, Decoder
from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams

V = 50


def greedy_step(seed: int, logprobs: bool = False) -> tuple[list[DecodeItem], torch.Tensor]:
    """A batch of greedy items (AR, cold ISD, ISD with drafts; num_verified and budgets below K; the lossy
    confidence rule, which greedy makes exact) and logits whose argmaxes match the drafts about half the time."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=64, logprobs=2 if logprobs else None)
    items, rows = [], []
    for i in range(7):
        kind = rng.choice(["ar", "cold", "drafts", "drafts", "specs", "confidence"])
        stride = 1 if kind == "ar" else rng.choice([2, 3, 4, 6])
        d = Decoding("ar") if kind == "ar" else Decoding(
            "isd", stride, verify_num_specs=rng.randrange(stride - 1) if kind == "specs" else None,
            confidence_accept_threshold=0.7 if kind == "confidence" else 0.0)
        k = 0 if kind in ("ar", "cold") else stride - 1
        drafts = [rng.randrange(V) for _ in range(k)]
        budget = rng.choice([64, 64, 2, 1])
        items.append(DecodeItem(i, i, params, d, i, 10, drafts, budget))
        for j in range(k + 1 + d.num_masks):
            row = torch.randn(V, generator=torch.Generator().manual_seed(seed * 100 + len(rows)))
            if j < k and rng.random() < 0.6:
                row[drafts[j]] = row.max() + 1.0  # the draft is this row's argmax
            rows.append(row)
    return items, torch.stack(rows)


@pytest.mark.parametrize("seed", range(12))
def test_argmax_path_equals_the_distribution_path(seed, monkeypatch):
    items, logits = greedy_step(seed, logprobs=seed % 3 == 0)
    fast = Decoder(V, len(items)).decode(items, logits)
    monkeypatch.setattr(decoder_module, "_argmax_only", lambda it: False)
    general = Decoder(V, len(items)).decode(items, logits)
    assert fast == general
    assert any(r.rejected for r in fast) and any(r.tokens[:-1] for r in fast)  # both branches were exercised


def test_argmax_path_is_taken_only_where_it_applies(monkeypatch):
    calls = []
    monkeypatch.setattr(Decoder, "_decode_argmax", lambda self, items, logits: calls.append(len(items)) or [])
    items, logits = greedy_step(0)
    Decoder(V, len(items)).decode(items, logits)
    assert calls == [len(items)]
    for change in [dict(params=SamplingParams(temperature=0.5, max_tokens=8)),
                   dict(params=SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.2)),
                   dict(decoding=Decoding("isd", 3, fast_verify=True))]:
        it = items[0]
        other = DecodeItem(it.request_id, it.slot, change.get("params", it.params), change.get("decoding", it.decoding),
                           it.seed, it.position, [], it.budget)
        dec = Decoder(V, 1)
        dec.start([other.slot], [[1, 2]])  # the penalty history
        dec.decode([other], torch.randn(other.num_rows, V))
        assert calls == [len(items)], change


def test_row_count_mismatch_is_an_error():
    items, logits = greedy_step(1)
    with pytest.raises(ValueError, match="logit rows"):
        Decoder(V, len(items)).decode(items, logits[:-1])
