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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from idlm.models.attention import DenseAttention
from idlm.models.llama import CausalLM

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

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def allmasked_attention_mask(length: int, block_size: int) -> torch.Tensor:
    """The 2L x 2L boolean mask of B.2.5 for one sample of L tokens (rows = queries)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    i = torch.arange(length)
    q, k = i[:, None], i[None, :]
    causal = k <= q
    bq, bk = q // block_size, k // block_size
    clean_clean = causal
    noisy_noisy = (bk == bq) & causal
    noisy_clean = bk < bq
    clean_noisy = torch.zeros(length, length, dtype=torch.bool)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def build_example(
    ids: Sequence[int] | torch.Tensor,
    prompt_len: int,
    mask_id: int,
    block_size: int,
    response_mask: Sequence[bool] | torch.Tensor | None = None,
) -> Example:
    """Build `[x_t | x_0]` for x_0 = `ids`, whose tokens from `prompt_len` on are the response.

    `response_mask` (optional, length L) overrides `prompt_len` to mark response tokens explicitly.
    """
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
    xt = x0.masked_fill(resp, mask_id)
    labels = x0.masked_fill(~resp, IGNORE)
    shifted = torch.full_like(labels, IGNORE)
    shifted[:-1] = labels[1:]
    valid = shifted != IGNORE
    task = resp & valid  # masked noisy rows whose next token is a response token
    pos = torch.arange(n)
    return Example(
        input_ids=torch.cat([xt, x0]),
        positions=torch.cat([pos, pos]),
        attn_mask=allmasked_attention_mask(n, block_size),
        targets=torch.cat([shifted, shifted]),
        task_mask=torch.cat([task, torch.zeros(n, dtype=torch.bool)]),
        clean_mask=torch.cat([torch.zeros(n, dtype=torch.bool), valid]),
        num_response=int(resp.sum()),
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
    num_tokens: int  # real (unpadded) rows, for throughput

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
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
    for j, e in enumerate(examples):
        n = e.length
        ids[j, :n], pos[j, :n], tgt[j, :n] = e.input_ids, e.positions, e.targets
        mask[j, :n, :n] = e.attn_mask
        mask[j, :n, n:] = False
        task[j, :n], clean[j, :n] = e.task_mask, e.clean_mask
    nresp = torch.tensor([max(e.num_response, 1) for e in examples], dtype=torch.float32)
    return Batch(ids, pos, mask.unsqueeze(1), tgt, task, clean, nresp, sum(e.length for e in examples))


@dataclass
class LossConfig:
    alpha: float = 0.2
    loss_auto_balance: bool = False
    gated: bool = False  # gated adapter: the clean term reaches no trainable parameter, skip it


class AllMaskedLoss(nn.Module):
    """Wraps the model so one `forward(batch)` returns the loss (a single module for DDP to wrap).

    The loss of a batch is the mean over its samples of task_i + alpha * clean_i (per-sample B.3 loss);
    logits are computed only at rows that carry a loss.
    """

    def __init__(self, model: CausalLM, cfg: LossConfig, lora_mode: str = "none"):
        super().__init__()
        if lora_mode not in ("none", "all", "gated"):
            raise ValueError(f"lora_mode must be none|all|gated, got {lora_mode!r}")
        self.model = model
        self.cfg = cfg
        self.lora_mode = lora_mode

    def gate(self, input_ids: torch.Tensor):
        """Per-row LoRA gate: MASK rows only for a gated adapter (as in serving); None = every row."""
        if self.lora_mode == "gated":
            return (input_ids == self.model.mask_token_id).float()
        return None

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = self.model(batch.input_ids, batch.positions, DenseAttention(batch.attn_mask), self.gate(batch.input_ids))
        b = batch.input_ids.shape[0]
        sample = torch.arange(b, device=hidden.device)[:, None].expand_as(batch.targets)

        def per_sample_ce(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model.logits(hidden[rows]).float()
            ce = F.cross_entropy(logits, batch.targets[rows], reduction="none")
            owner = sample[rows]
            total = torch.zeros(b, device=hidden.device, dtype=torch.float32).index_add(0, owner, ce)
            count = torch.zeros(b, device=hidden.device, dtype=torch.float32).index_add(
                0, owner, torch.ones_like(ce)
            )
            return total, count

        tsum, _ = per_sample_ce(batch.task_mask)
        task = (tsum / batch.num_response.to(tsum.device)).mean()
        out = {"task": task}
        if self.cfg.gated:
            out["loss"] = task
            return out
        csum, ccount = per_sample_ce(batch.clean_mask)
        clean = (csum / ccount.clamp(min=1)).mean()
        if self.cfg.loss_auto_balance:
            loss = task + (task.detach() / clean.detach().clamp(min=1e-8)) * clean
        else:
            loss = task + self.cfg.alpha * clean
        out.update(clean=clean, loss=loss)
        return out
