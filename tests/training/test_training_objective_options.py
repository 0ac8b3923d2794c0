"""Objective options against hand computation: draft indices, position weights, soft targets (forward KL /
total variation to the base model's clean-row distribution, or to the marginal over the skipped token), gradients
only where they belong, and the block-size curriculum in the training loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idlm.models.attention import DenseAttention, KVRecorder
from idlm.models.llama import LORA_OFF
from idlm.training.config import ConfigError
from idlm.training.objective import (
    AllMaskedLoss, LossConfig, build_example, build_gated_example, collate, collate_gated, draft_index,
    marginal_teacher,
)
from idlm.training.trainer import Trainer, prepare_model, random_model
from training_helpers import TINY_MODEL, read_metrics, tiny_config

DRAFT_LEN = 3
SPECS = [(20, 7), (13, 2), (17, 9)]  # (length, prompt length)


def test_draft_index_counts_masks_in_the_block():
    resp = torch.tensor([False] * 5 + [True] * 7)  # blocks of 3: [0-2][3-5][6-8][9-11], response from 5
    assert draft_index(resp, 3).tolist() == [-1, -1, -1, -1, -1, 0, 0, 1, 2, 0, 1, 2]
    ex = build_gated_example(list(range(1, 13)), 5, 47, 3)
    assert ex.draft_index.tolist() == [0, 0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("opt"), mode="gated_lora", lora={"r": 4, "alpha": 8},
                      draft_len=DRAFT_LEN)
    model = random_model(TINY_MODEL, 0)
    prepare_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    specs = [(torch.randint(0, 40, (n,), generator=g).tolist(), pl) for n, pl in SPECS]
    return model, specs


def hand_rows(model, specs):
    """Per task row of every example: (sample, position, student logits from the one-pass [x_t | x_0] forward,
    base logits of the clean causal forward at the SAME position, target, draft index)."""
    rows = []
    with torch.no_grad():
        for s, (ids, pl) in enumerate(specs):
            ex = build_example(ids, pl, model.mask_token_id, DRAFT_LEN)
            gate = (ex.input_ids == model.mask_token_id).float()[None]
            hidden = model(ex.input_ids[None], ex.positions[None], DenseAttention(ex.attn_mask[None, None]), gate)
            student = model.logits(hidden[0]).float()
            x0 = torch.tensor(ids)
            causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            base = model.logits(model(x0[None], torch.arange(len(ids))[None], DenseAttention(causal[None, None]),
                                      LORA_OFF)[0]).float()
            for i in ex.task_mask.nonzero().flatten().tolist():
                rows.append((s, i, student[i], base[i], int(ex.targets[i]), int(ex.draft_index[i])))
    return rows


def per_sample(rows, value, specs):
    totals = [0.0] * len(specs)
    for r in rows:
        totals[r[0]] += value(r)
    return sum(t / (n - pl) for t, (n, pl) in zip(totals, SPECS)) / len(specs)


def gated_loss(model, specs, **cfg):
    batch = collate_gated([build_gated_example(ids, pl, model.mask_token_id, DRAFT_LEN) for ids, pl in specs])
    return AllMaskedLoss(model, LossConfig(gated=True, **cfg), lora_mode="gated")(batch)


def test_position_weights_change_the_loss_exactly_as_the_weighted_sum(setup):
    model, specs = setup
    rows = hand_rows(model, specs)
    ce = lambda r: float(F.cross_entropy(r[2][None], torch.tensor([r[4]])))  # noqa: E731
    for decay in (1.0, 0.5):
        want = per_sample(rows, lambda r: decay ** r[5] * ce(r), specs)
        assert float(gated_loss(model, specs, position_decay=decay)["loss"].detach()) == pytest.approx(want, rel=1e-5)
        one = collate([build_example(ids, pl, model.mask_token_id, DRAFT_LEN) for ids, pl in specs])
        got = AllMaskedLoss(model, LossConfig(gated=True, position_decay=decay), lora_mode="gated")(one)["loss"]
        assert float(got.detach()) == pytest.approx(want, rel=1e-5)  # the one-pass form weighs the same rows alike
    assert {r[5] for r in rows} == {0, 1, 2}


@pytest.mark.parametrize("kind", ["kl", "tv"])
def test_soft_targets_are_the_divergence_to_the_base_row_at_the_same_position(setup, kind):
    model, specs = setup
    rows = hand_rows(model, specs)

    def div(r, teacher):
        p, q = F.softmax(teacher, -1), F.softmax(r[2], -1)
        return float((p * (p.log() - q.log())).sum()) if kind == "kl" else float(0.5 * (p - q).abs().sum())

    want = per_sample(rows, lambda r: div(r, r[3]), specs)
    out = {k: v.detach() for k, v in gated_loss(model, specs, soft_weight=1.0, soft_kind=kind).items()}
    assert float(out["soft"]) == pytest.approx(want, rel=1e-4) and float(out["loss"]) == pytest.approx(want, rel=1e-4)
    # the teacher one row later (the off-by-one a shift error would make) gives a different number
    later = {(r[0], r[1]): r for r in hand_rows(model, specs)}
    base_next = lambda r: later[(r[0], r[1] + 1)][3] if (r[0], r[1] + 1) in later else r[3]  # noqa: E731
    assert per_sample(rows, lambda r: div(r, base_next(r)), specs) != pytest.approx(want, rel=1e-3)
    mixed = {k: v.detach() for k, v in gated_loss(model, specs, soft_weight=0.3, soft_kind=kind).items()}
    assert float(mixed["loss"]) == pytest.approx(0.7 * float(mixed["hard"]) + 0.3 * float(mixed["soft"]), rel=1e-6)


def base_probs(model, ids):
    """The base model's next-token distribution after `ids` (adapter off, plain causal forward)."""
    x = torch.tensor(ids)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    with torch.no_grad():
        hidden = model(x[None], torch.arange(len(ids))[None], DenseAttention(causal[None, None]), LORA_OFF)
    return F.softmax(model.logits(hidden[0, -1]).float(), -1)


def hand_marginal(model, ids, i, top_k, skipped_at=None):
    """sum_k p(k | ids[<i]) p(. | ids[<i], k) / sum_k p(k | ids[<i]), k over ids[i] and the top_k - 1 likeliest
    others. `skipped_at` = i + 1 is the off-by-one (the token after the skipped one taken as unknown)."""
    j = i if skipped_at is None else skipped_at
    p = base_probs(model, ids[:j])
    others = p.clone()
    others[ids[j]] = 0
    ks = [ids[j]] + others.topk(top_k - 1).indices.tolist()
    return sum(p[k] * base_probs(model, ids[:j] + [k]) for k in ks) / sum(p[k] for k in ks)


@pytest.mark.parametrize("top_k", [1, 3])
def test_marginal_teacher_is_the_base_distribution_with_the_skipped_token_unknown(setup, top_k):
    model, specs = setup
    rows = hand_rows(model, specs)

    def kl(p, logits):
        return float((p * (p.log() - F.log_softmax(logits, -1))).sum())

    def row_soft(r):
        if r[5] != 0:  # later draft positions have no soft target
            return 0.0
        return kl(hand_marginal(model, specs[r[0]][0], r[1], top_k), r[2])

    def row_ce(r):
        return float(F.cross_entropy(r[2][None], torch.tensor([r[4]])))

    # the random token ids make x0[i] rarely the base model's top token: the teacher must branch on it anyway
    assert any(int(base_probs(model, specs[r[0]][0][: r[1]]).argmax()) != specs[r[0]][0][r[1]] for r in rows)
    want = per_sample(rows, row_soft, specs)
    out = {k: v.detach() for k, v in gated_loss(model, specs, soft_weight=1.0, soft_teacher="marginal",
                                                soft_top_k=top_k).items()}
    assert float(out["soft"]) == pytest.approx(want, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(per_sample(rows, lambda r: row_soft(r) if r[5] == 0 else row_ce(r),
                                                          specs), rel=1e-5)  # later positions: the hard CE alone
    # the teacher itself, batched over the examples, against the brute force; an off-by-one is far from it
    batch = collate_gated([build_gated_example(ids, pl, model.mask_token_id, DRAFT_LEN) for ids, pl in specs])
    clean = KVRecorder()
    with torch.no_grad():
        hidden = model(batch.clean_ids, torch.arange(batch.clean_ids.shape[1]).expand_as(batch.clean_ids), clean,
                       LORA_OFF)
    d0 = [r for r in rows if r[5] == 0]
    s_, p_ = torch.tensor([r[0] for r in d0]), torch.tensor([r[1] for r in d0])
    prev, here = (F.softmax(model.logits(hidden[s_, q]).float(), -1) for q in (p_ - 1, p_))
    got = marginal_teacher(model, clean, prev, here, batch.clean_ids[s_, p_], s_, p_, top_k)
    for g, r in zip(got, d0):
        ids = specs[r[0]][0]
        assert torch.allclose(g, hand_marginal(model, ids, r[1], top_k), atol=1e-6)
        if r[1] + 2 < len(ids):
            assert (g - hand_marginal(model, ids, r[1], top_k, skipped_at=r[1] + 1)).abs().max() > 1e-4
    if top_k == 1:  # the branch x0[i] alone: the clean row at the same position, but at draft index 0 only
        every_row = {k: v.detach() for k, v in gated_loss(model, specs, soft_weight=1.0).items()}
        d0 = per_sample(rows, lambda r: kl(F.softmax(r[3], -1), r[2]) if r[5] == 0 else 0.0, specs)
        assert float(out["soft"]) == pytest.approx(d0, rel=1e-4)
        assert float(every_row["soft"]) > float(out["soft"]) * 1.1


@pytest.mark.parametrize("teacher", ["clean", "marginal"])
def test_soft_target_gradients_reach_only_the_adapter_and_the_mask_embedding(setup, teacher):
    model, specs = setup
    model.zero_grad(set_to_none=True)
    gated_loss(model, specs, soft_weight=0.5, soft_teacher=teacher)["loss"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".lora_" in n or "mask_embedding" in n for n in got), sorted(got)
    assert any("mask_embedding" in n for n in got)
    model.zero_grad(set_to_none=True)


def test_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="gated_lora"):
        tiny_config(tmp_path, mode="lora", soft_weight=0.5)
    with pytest.raises(ConfigError, match="ends at"):
        tiny_config(tmp_path, draft_len_schedule=[[0, 1], [3, 2]])
    with pytest.raises(ConfigError, match="rising"):
        tiny_config(tmp_path, draft_len_schedule=[[0, 1], [0, 3]])
    with pytest.raises(ConfigError, match="soft_teacher"):
        tiny_config(tmp_path, mode="gated_lora", soft_weight=0.5, soft_teacher="oracle")
    with pytest.raises(ConfigError, match="soft_top_k"):
        tiny_config(tmp_path, mode="gated_lora", soft_weight=0.5, soft_teacher="marginal", soft_top_k=0)


def test_curriculum_block_size_follows_the_schedule(tmp_path):
    cfg = tiny_config(tmp_path, mode="gated_lora", lora={"r": 4, "alpha": 8}, max_steps=6,
                      draft_len_schedule=[[0, 1], [2, 2], [4, 3]], soft_weight=0.2, position_decay=0.8,
                      soft_teacher="marginal")
    assert [cfg.draft_len_at(s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    seen = []
    trainer = Trainer(cfg)
    build = trainer._micro_batch

    def spy(micro):
        batch = build(micro)
        seen.append(int(batch.draft_index.max()) + 1)  # a block of b MASKs has draft indices 0..b-1
        return batch

    trainer._micro_batch = spy
    trainer.train()
    assert seen == [1, 1, 2, 2, 3, 3]
    metrics = read_metrics(cfg.output_dir)
    assert [m["draft_len"] for m in metrics] == [1, 1, 2, 2, 3, 3] and all("soft" in m for m in metrics)
