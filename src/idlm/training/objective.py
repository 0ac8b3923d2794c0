"""The all-masked introspective-consistency objective (idlm-algorithm.md B.2-B.3), on idlm's own model.

One example of length L becomes a sequence of 2L rows, `[x_t | x_0]`:
- x_0 is the clean text (prompt + response); x_t is x_0 with every response token replaced by MASK;
- both halves carry positions 0..L-1;
- the 2L x 2L attention mask, with blk(i) = i // b inside each half (True = may attend):
    clean q -> clean k : k <= q                       (ordinary causal)
    noisy q -> noisy k : blk(k) == blk(q) and k <= q  (causal inside the block only)
    noisy q -> clean k : blk(k) < blk(q)              (all clean tokens of strictly earlier blocks)
    clean q -> noisy k : never
- targets with the logit shift: the row at position i predicts x_0[i+1] where that token is a response token.

Loss (B.3): task = sum of CE at masked noisy rows with a valid shifted target / number of response tokens;
clean = mean CE over clean rows with a valid shifted target; loss = task + alpha * clean (or the
`loss_auto_balance` form). With a gated adapter the clean rows see no adapter delta (gate 0: their input is
never MASK) and the base is frozen, so the clean term cannot move any trainable parameter: it is skipped.

Gated adapters train in two passes with the same loss and gradients (`GatedExample`): the clean half is the
base model's plain causal forward over x_0 (no gradient, its k/v kept per layer), and only the noisy rows
that differ from their clean twin run with gradients, attending to those clean k/v. A noisy row differs
iff a response token (MASK) lies at or before it in its own block; every other noisy row (the prompt, in a
chat example) sees exactly what its clean twin sees, so its k/v are the clean ones. This replaces a 2L-row
forward and backward by an L-row forward and an R-row forward and backward (R ~ response length).

Options (LossConfig), each measured in docs/training.md:
- position weights: the task CE of a noisy row is weighted by `position_decay ** d`, d its draft index (the
  number of MASKs before it in its block: at stride N = b + 1 the row predicts the draft at offset d + 2
  from the last clean token, and a draft after a rejected one is never used);
- soft targets (gated two-pass only, where the clean pass already runs the base model): the noisy row at
  position i also learns the base model's next-token distribution at the clean row i (adapter off,
  detached, temperature 1; the row whose hard target is the same x_0[i + 1]), by forward KL or by total
  variation (1 - the expected acceptance of a draft sampled from the adapter and verified against the
  base); task = (1 - soft_weight) * CE + soft_weight * soft. With `soft_teacher: marginal` the teacher is
  instead what the row can know: the rows of draft index 0 (x_0[i] the first MASK of its block) learn the
  base model's distribution of x_0[i + 1] with x_0[i] unknown, sum_k p(k | x_0[<i]) p(. | x_0[<i], k) over
  k = x_0[i] and the `soft_top_k - 1` likeliest other tokens (renormalised; `marginal_teacher`); the other
  rows keep the hard CE alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from idlm.models.attention import DenseAttention, KVRecorder, PrefixAttention
from idlm.models.llama import LORA_OFF, CausalLM

IGNORE = -100


@dataclass
class Example:
    """One `[x_t | x_0]` training example (all tensors of length 2L, mask 2L x 2L)."""

    input_ids: torch.Tensor  # [2L] long
    positions: torch.Tensor  # [2L] long
    attn_mask: torch.Tensor  # [2L, 2L] bool, True = query row may attend key column
    targets: torch.Tensor  # [2L] long, IGNORE where the row has no loss
    task_mask: torch.Tensor  # [2L] bool: noisy rows that enter the task loss
    clean_mask: torch.Tensor  # [2L] bool: clean rows that enter the clean loss
    num_response: int  # number of response (masked) tokens: the task-loss denominator
    draft_index: torch.Tensor  # [2L] long: a noisy row's draft index (see `draft_index`), 0 elsewhere

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def allmasked_attention_mask(length: int, draft_len: int) -> torch.Tensor:
    """The 2L x 2L boolean mask of B.2.5 for one sample of L tokens (rows = queries)."""
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    i = torch.arange(length)
    q, k = i[:, None], i[None, :]
    causal = k <= q
    bq, bk = q // draft_len, k // draft_len
    clean_clean = causal
    noisy_noisy = (bk == bq) & causal
    noisy_clean = bk < bq
    clean_noisy = torch.zeros(length, length, dtype=torch.bool)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def _response_targets(
    ids: Sequence[int] | torch.Tensor, prompt_len: int, response_mask: Sequence[bool] | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_0, response mask, shifted targets: the next token where it is a response token, else IGNORE)."""
    x0 = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long).flatten()
    n = int(x0.shape[0])
    if n < 2:
        raise ValueError("an example needs at least 2 tokens")
    if response_mask is None:
        if not 0 <= prompt_len <= n:
            raise ValueError(f"prompt_len {prompt_len} outside 0..{n}")
        resp = torch.arange(n) >= prompt_len
    else:
        resp = torch.as_tensor(response_mask, dtype=torch.bool).flatten()
        if resp.shape[0] != n:
            raise ValueError("response_mask length differs from ids")
    labels = x0.masked_fill(~resp, IGNORE)
    shifted = torch.full_like(labels, IGNORE)
    shifted[:-1] = labels[1:]
    return x0, resp, shifted


def draft_index(resp: torch.Tensor, draft_len: int) -> torch.Tensor:
    """Per position: MASKs (response tokens) at or before it inside its block, minus one (-1 for none)."""
    n = int(resp.shape[0])
    blk = torch.arange(n) // draft_len
    count = torch.cumsum(resp.long(), 0)
    before_block = torch.where(blk > 0, count[(blk * draft_len - 1).clamp(min=0)], torch.zeros_like(count))
    return count - before_block - 1


def build_example(
    ids: Sequence[int] | torch.Tensor,
    prompt_len: int,
    mask_id: int,
    draft_len: int,
    response_mask: Sequence[bool] | torch.Tensor | None = None,
) -> Example:
    """Build `[x_t | x_0]` for x_0 = `ids`, whose tokens from `prompt_len` on are the response.

    `response_mask` (optional, length L) overrides `prompt_len` to mark response tokens explicitly.
    """
    x0, resp, shifted = _response_targets(ids, prompt_len, response_mask)
    n = int(x0.shape[0])
    xt = x0.masked_fill(resp, mask_id)
    valid = shifted != IGNORE
    task = resp & valid  # masked noisy rows whose next token is a response token
    pos = torch.arange(n)
    return Example(
        input_ids=torch.cat([xt, x0]),
        positions=torch.cat([pos, pos]),
        attn_mask=allmasked_attention_mask(n, draft_len),
        targets=torch.cat([shifted, shifted]),
        task_mask=torch.cat([task, torch.zeros(n, dtype=torch.bool)]),
        clean_mask=torch.cat([torch.zeros(n, dtype=torch.bool), valid]),
        num_response=int(resp.sum()),
        draft_index=torch.cat([draft_index(resp, draft_len).clamp(min=0), torch.zeros(n, dtype=torch.long)]),
    )


@dataclass
class Batch:
    """Examples right-padded to a common length. Padding rows attend to themselves only and carry no loss."""

    input_ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    attn_mask: torch.Tensor  # [B, 1, T, T]
    targets: torch.Tensor  # [B, T]
    task_mask: torch.Tensor  # [B, T]
    clean_mask: torch.Tensor  # [B, T]
    num_response: torch.Tensor  # [B] float
    num_tokens: int  # text tokens (L per example), for throughput
    draft_index: torch.Tensor  # [B, T] long

    def to(self, device: torch.device | str):
        return type(self)(
            **{
                k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()
            }
        )


def collate(examples: list[Example], pad_id: int = 0, pad_to_multiple: int = 8) -> Batch:
    if not examples:
        raise ValueError("empty batch")
    t = max(e.length for e in examples)
    t = -(-t // pad_to_multiple) * pad_to_multiple
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)  # padding rows: self only (no all-False row)
    tgt = torch.full((b, t), IGNORE, dtype=torch.long)
    task = torch.zeros((b, t), dtype=torch.bool)
    clean = torch.zeros((b, t), dtype=torch.bool)
    dix = torch.zeros((b, t), dtype=torch.long)
    for j, e in enumerate(examples):
        n = e.length
        ids[j, :n], pos[j, :n], tgt[j, :n] = e.input_ids, e.positions, e.targets
        mask[j, :n, :n] = e.attn_mask
        mask[j, :n, n:] = False
        task[j, :n], clean[j, :n], dix[j, :n] = e.task_mask, e.clean_mask, e.draft_index
    nresp = torch.tensor([max(e.num_response, 1) for e in examples], dtype=torch.float32)
    return Batch(ids, pos, mask.unsqueeze(1), tgt, task, clean, nresp, sum(e.length for e in examples) // 2, dix)


@dataclass
class GatedExample:
    """The two-pass form of one `[x_t | x_0]` example for a gated adapter (see the module docstring)."""

    clean_ids: torch.Tensor  # [L] x_0, positions 0..L-1, plain causal, base model only
    noisy_ids: torch.Tensor  # [R] the noisy rows that differ from their clean twin (MASK or after one in-block)
    noisy_positions: torch.Tensor  # [R]
    noisy_mask: torch.Tensor  # [R, L + R] bool over [clean keys | noisy keys]
    targets: torch.Tensor  # [R]
    task_mask: torch.Tensor  # [R]
    num_response: int
    draft_index: torch.Tensor  # [R] long


def build_gated_example(
    ids: Sequence[int] | torch.Tensor,
    prompt_len: int,
    mask_id: int,
    draft_len: int,
    response_mask: Sequence[bool] | torch.Tensor | None = None,
) -> GatedExample:
    """Two-pass form of `build_example(...)`: same loss, same gradients for a gated adapter."""
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    x0, resp, shifted = _response_targets(ids, prompt_len, response_mask)
    n = int(x0.shape[0])
    pos = torch.arange(n)
    blk = pos // draft_len
    index = draft_index(resp, draft_len)
    differs = index >= 0  # some response token at or before it inside its block
    rows = differs.nonzero().flatten()
    bq = blk[rows][:, None]
    to_clean = (blk[None, :] < bq) | ((blk[None, :] == bq) & (pos[None, :] <= rows[:, None]) & ~differs[None, :])
    to_noisy = (blk[rows][None, :] == bq) & (rows[None, :] <= rows[:, None])
    return GatedExample(
        clean_ids=x0,
        noisy_ids=x0[rows].masked_fill(resp[rows], mask_id),
        noisy_positions=rows,
        noisy_mask=torch.cat([to_clean, to_noisy], dim=1),
        targets=shifted[rows],
        task_mask=resp[rows] & (shifted[rows] != IGNORE),
        num_response=int(resp.sum()),
        draft_index=index[rows],
    )


@dataclass
class GatedBatch:
    """GatedExamples right-padded: clean rows [B, L], noisy rows [B, R]; padding carries no loss."""

    clean_ids: torch.Tensor
    noisy_ids: torch.Tensor
    noisy_positions: torch.Tensor
    noisy_mask: torch.Tensor  # [B, 1, R, L + R]
    targets: torch.Tensor
    task_mask: torch.Tensor
    num_response: torch.Tensor  # [B] float
    num_tokens: int  # text tokens (L per example), for throughput
    draft_index: torch.Tensor  # [B, R] long

    to = Batch.to


def collate_gated(examples: list[GatedExample], pad_id: int = 0, pad_to_multiple: int = 8) -> GatedBatch:
    if not examples:
        raise ValueError("empty batch")
    up = lambda x: max(1, -(-x // pad_to_multiple) * pad_to_multiple)  # noqa: E731
    b = len(examples)
    lmax = up(max(len(e.clean_ids) for e in examples))
    rmax = up(max(len(e.noisy_ids) for e in examples))
    clean = torch.full((b, lmax), pad_id, dtype=torch.long)
    noisy = torch.full((b, rmax), pad_id, dtype=torch.long)
    npos = torch.zeros((b, rmax), dtype=torch.long)
    mask = torch.zeros((b, rmax, lmax + rmax), dtype=torch.bool)
    mask[:, :, lmax:] = torch.eye(rmax, dtype=torch.bool)  # padding rows: self only (no all-False row)
    tgt = torch.full((b, rmax), IGNORE, dtype=torch.long)
    task = torch.zeros((b, rmax), dtype=torch.bool)
    dix = torch.zeros((b, rmax), dtype=torch.long)
    for j, e in enumerate(examples):
        n, r = len(e.clean_ids), len(e.noisy_ids)
        clean[j, :n] = e.clean_ids
        noisy[j, :r], npos[j, :r], tgt[j, :r], task[j, :r] = e.noisy_ids, e.noisy_positions, e.targets, e.task_mask
        dix[j, :r] = e.draft_index
        mask[j, :r, :] = False
        mask[j, :r, :n] = e.noisy_mask[:, :n]
        mask[j, :r, lmax:lmax + r] = e.noisy_mask[:, n:]
    nresp = torch.tensor([max(e.num_response, 1) for e in examples], dtype=torch.float32)
    return GatedBatch(clean, noisy, npos, mask.unsqueeze(1), tgt, task, nresp, sum(len(e.clean_ids) for e in examples),
                      dix)


@dataclass
class LossConfig:
    alpha: float = 0.2
    loss_auto_balance: bool = False
    gated: bool = False  # gated adapter: the clean term reaches no trainable parameter, skip it
    position_decay: float = 1.0  # task CE of draft index d weighted by position_decay ** d (1: uniform)
    soft_weight: float = 0.0  # share of the soft-target term in the task loss (gated two-pass only)
    soft_kind: str = "kl"  # kl: forward KL(base || adapter); tv: total variation = 1 - expected acceptance
    soft_teacher: str = "clean"  # clean: the base row at the same position; marginal: `marginal_teacher`
    soft_top_k: int = 4  # branches of the marginal teacher (x_0[i] and the likeliest others)
    # (ranges are checked once, by TrainConfig.validate)


class AllMaskedLoss(nn.Module):
    """Wraps the model so one `forward(batch)` returns the loss (a single module for DDP to wrap).

    The loss of a batch is the mean over its samples of task_i + alpha * clean_i (per-sample B.3 loss);
    logits are computed only at rows that carry a loss.
    """

    def __init__(self, model: CausalLM, cfg: LossConfig, lora_mode: str = "none"):
        super().__init__()
        if lora_mode not in ("none", "all", "gated"):
            raise ValueError(f"lora_mode must be none|all|gated, got {lora_mode!r}")
        if cfg.soft_weight > 0 and lora_mode != "gated":
            raise ValueError("soft targets need the gated two-pass objective (its clean pass is the base model)")
        self.model = model
        self.cfg = cfg
        self.lora_mode = lora_mode

    def gate(self, input_ids: torch.Tensor):
        """Per-row LoRA gate: MASK rows only for a gated adapter (as in serving); None = every row."""
        if self.lora_mode == "gated":
            return (input_ids == self.model.mask_token_id).float()
        return None

    def forward(self, batch: Batch | GatedBatch) -> dict[str, torch.Tensor]:
        if isinstance(batch, GatedBatch):
            return self._two_pass(batch)
        hidden = self.model(batch.input_ids, batch.positions, DenseAttention(batch.attn_mask), self.gate(batch.input_ids))
        task = self._per_sample(self._row_ce(hidden, batch.targets, batch.task_mask, batch.draft_index),
                                batch.task_mask, batch.num_response)
        out = {"task": task}
        if self.cfg.gated:
            out["loss"] = task
            return out
        clean = self._per_sample(self._row_ce(hidden, batch.targets, batch.clean_mask), batch.clean_mask, None)
        if self.cfg.loss_auto_balance:
            loss = task + (task.detach() / clean.detach().clamp(min=1e-8)) * clean
        else:
            loss = task + self.cfg.alpha * clean
        out.update(clean=clean, loss=loss)
        return out

    def _two_pass(self, batch: GatedBatch) -> dict[str, torch.Tensor]:
        """Gated adapters: clean half without gradient (k/v kept), then only the noisy rows that differ."""
        if self.lora_mode != "gated":
            raise ValueError("the two-pass objective is exact for gated adapters only")
        clean = KVRecorder()
        rows = batch.task_mask
        sample = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)[rows]
        pos, index = batch.noisy_positions[rows], batch.draft_index[rows]
        with torch.no_grad():
            clean_pos = torch.arange(batch.clean_ids.shape[1], device=pos.device).expand_as(batch.clean_ids)
            clean_hidden = self.model(batch.clean_ids, clean_pos, clean, LORA_OFF)
            taught, teacher = self._teacher(batch.clean_ids, clean, clean_hidden, sample, pos, index)
        hidden = self.model(batch.noisy_ids, batch.noisy_positions, PrefixAttention(clean.kv, batch.noisy_mask),
                            self.gate(batch.noisy_ids))
        logits = self.model.logits(hidden[rows]).float()
        ce = F.cross_entropy(logits, batch.targets[rows], reduction="none")
        out = {"hard": self._per_sample(self._weighted(ce, index), rows, batch.num_response)}
        if teacher is None:
            out["task"] = out["loss"] = out["hard"]
            return out
        soft = torch.zeros_like(ce).masked_scatter(taught, soft_target_loss(teacher, logits[taught],
                                                                            self.cfg.soft_kind))
        task = ce + self.cfg.soft_weight * taught * (soft - ce)  # (1 - w) * CE + w * soft where taught
        out["soft"] = self._per_sample(self._weighted(soft, index), rows, batch.num_response)
        out["task"] = out["loss"] = self._per_sample(self._weighted(task, index), rows, batch.num_response)
        return out

    def _teacher(self, clean_ids: torch.Tensor, clean: KVRecorder, clean_hidden: torch.Tensor, sample: torch.Tensor,
                 pos: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(which task rows have a soft target, the teacher's logits (log-probabilities up to a constant) at
        those rows) from the clean pass."""
        if self.cfg.soft_weight == 0:
            return torch.zeros_like(pos, dtype=torch.bool), None
        if self.cfg.soft_teacher == "clean":  # the clean row at the noisy row's own position
            return torch.ones_like(pos, dtype=torch.bool), self.model.logits(clean_hidden[sample, pos]).float()
        taught = (index == 0) & (pos >= 1)
        s, p = sample[taught], pos[taught]
        prev, here = (torch.softmax(self.model.logits(clean_hidden[s, q]).float(), -1) for q in (p - 1, p))
        mix = marginal_teacher(self.model, clean, prev, here, clean_ids[s, p], s, p, self.cfg.soft_top_k)
        return taught, mix.clamp(min=1e-30).log()

    def _weighted(self, per_row: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_decay == 1.0:
            return per_row
        return per_row * self.cfg.position_decay ** index.to(per_row.dtype)

    def _row_ce(self, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """CE at `rows` (flattened in row order), position-weighted when `index` is given."""
        ce = F.cross_entropy(self.model.logits(hidden[rows]).float(), targets[rows], reduction="none")
        return ce if index is None else self._weighted(ce, index[rows])

    @staticmethod
    def _per_sample(per_row: torch.Tensor, rows: torch.Tensor, denom: torch.Tensor | None) -> torch.Tensor:
        """Mean over samples of (sum of `per_row` at the sample's `rows`) / denom, or / its row count when None."""
        b = rows.shape[0]
        owner = torch.arange(b, device=rows.device)[:, None].expand_as(rows)[rows]
        total = torch.zeros(b, device=per_row.device, dtype=torch.float32).index_add(0, owner, per_row)
        if denom is None:
            denom = torch.zeros(b, device=per_row.device, dtype=torch.float32).index_add(
                0, owner, torch.ones_like(per_row)).clamp(min=1)
        return (total / denom.to(total.device)).mean()


@torch.no_grad()
def marginal_teacher(model: CausalLM, clean: KVRecorder, prev: torch.Tensor, here: torch.Tensor,
                     skipped: torch.Tensor, sample: torch.Tensor, pos: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, V]: the base model's distribution of x_0[i + 1] with x_0[i] unknown, for N rows (sample, position i).

    sum_k p(k | x_0[<i]) p(. | x_0[<i], k) / sum_k p(k | x_0[<i]) over k = x_0[i] (`skipped`) and the `top_k - 1`
    likeliest other tokens. `prev` and `here` are the clean pass's next-token probabilities at rows i - 1 and i
    (`here` is the branch k = x_0[i]); every other branch is one row at position i holding k, attending to the clean
    keys before i (`clean`, a KVRecorder of the clean pass) and to itself. Rows are grouped by sample, in order.
    """
    weight = prev.gather(1, skipped[:, None])
    mix = weight * here
    total = weight.clone()
    k = top_k - 1
    if k > 0 and len(pos):
        top_p, top_ids = prev.scatter(1, skipped[:, None], 0.0).topk(k, -1)
        total += top_p.sum(-1, keepdim=True)
        b, length = clean.kv[0][0].shape[:2]
        counts = torch.bincount(sample, minlength=b)
        rank = torch.arange(len(pos), device=pos.device) - (counts.cumsum(0) - counts)[sample]
        slot = rank[:, None] * k + torch.arange(k, device=pos.device)  # [N, k]: each branch's row in its sample
        m = int(counts.max()) * k
        ids = torch.zeros(b, m, dtype=torch.long, device=pos.device)
        ids[sample[:, None], slot] = top_ids
        branch_pos = torch.zeros(b, m, dtype=torch.long, device=pos.device)
        branch_pos[sample[:, None], slot] = pos[:, None]
        to_clean = torch.zeros(b, m, length, dtype=torch.bool, device=pos.device)
        to_clean[sample[:, None], slot] = torch.arange(length, device=pos.device) < pos[:, None, None]
        mask = torch.cat([to_clean, torch.eye(m, dtype=torch.bool, device=pos.device).expand(b, m, m)], dim=-1)
        hidden = model(ids, branch_pos, PrefixAttention(clean.kv, mask[:, None]), LORA_OFF)
        for j in range(k):
            mix += top_p[:, j, None] * torch.softmax(model.logits(hidden[sample, slot[:, j]]).float(), -1)
    return mix / total


def soft_target_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row: forward KL(teacher || student), or total variation 0.5 * sum |p - q| = 1 - sum min(p, q)."""
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_q = F.log_softmax(student_logits, dim=-1)
    if kind == "kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"soft_kind must be kl or tv, got {kind!r}")
