"""LoRA and gated LoRA for the native model, stored in the PEFT adapter layout.

y = W x + g * (alpha / r) * B (A x), with g per row: 1 everywhere for a plain adapter, 1 only at MASK
rows for a gated (R-ISD) adapter. The gate is chosen by the caller (training: MASK positions; serving:
the decoding policy), so what is trained is what is served.

Files: `adapter_config.json` (PEFT fields + idlm fields `gated`, `mask_token_id`, `draft_len` (files written
before it was named so say `block_size`), `trained_stride`, `acceptance` (held-out greedy acceptance by draft
position)) and `adapter_model.safetensors` (PEFT key names, plus `idlm.mask_embedding` when the
MASK token is an extra input embedding).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from idlm.atomic_dir import publish_dir
from idlm.models.llama import LORA_OFF, CausalLM, Proj, RowGate

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
MASK_KEY = "idlm.mask_embedding"


AdapterKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]
"""(y, x, rows): adds a frozen adapter's delta for x[rows] to y[rows] in place (every row when rows is None)."""


class LoRAProj(Proj):
    """A projection with a low-rank delta; shares the frozen base weight of the Proj it wraps.

    `delta_kernel`: frozen inference only (`pack_adapter`): the delta added by a kernel of the caller's (the panel
    kernels' `PanelLoRA`, models/panel.py: one call per projection group), instead of the generic paths below; by
    the base product's own call where its kernel has a `fused(x, delta_kernel, rows)` (the panel kernels' float32
    and w8a8 products: the same bits, one call instead of two)."""

    delta_kernel: AdapterKernel | None = None
    blocks: list[tuple[int, int, int, int]] | None = None
    """(first row, end row, first column, end column) of B's nonzero blocks, when B is block-diagonal (models/
    fuse.py: a fused group's parts); None: B is one block."""

    def __init__(self, base: Proj, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor, lora_gate: RowGate | None | object = None) -> torch.Tensor:
        if lora_gate is LORA_OFF:
            return self.base(x)
        if self.delta_kernel is not None:
            rows = None if lora_gate is None else lora_gate.rows
            fused = getattr(self.kernel, "fused", None)
            if fused is not None:
                return fused(x, self.delta_kernel, rows)
            y = self.base(x)
            self.delta_kernel(y, x, rows)
            return y
        y = self.base(x)
        if lora_gate is None:
            return y + self._delta(x)
        # RowGate: only the gated rows get a delta
        flat, xf = y.reshape(-1, self.out_features), x.reshape(-1, self.in_features)
        if lora_gate.span is not None:
            a, b = lora_gate.span
            flat[a:b] += self._delta(xf[a:b]).to(flat.dtype)
            return y
        # the gated rows are distinct, so their sums are written back (index_copy), not accumulated: the
        # compiler lowers an index_add to atomic adds, which cost an R-ISD step ~1.5 ms (docs/architecture.md)
        rows = lora_gate.rows
        delta = self._delta(xf.index_select(0, rows)).to(flat.dtype)
        return flat.index_copy(0, rows, flat.index_select(0, rows) + delta).view_as(y)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # products of a few MASK rows: as BLAS calls each costs ~30 us of threading overhead whatever its
            # size (a step has two per projection group per layer); as multiply-and-sum the compiler emits one
            # fused loop per product (models/compile.py). Only drafts change by the different summation order.
            h = (x.unsqueeze(-2) * self.lora_A).sum(-1) * self.scaling
            return (h.unsqueeze(-2) * self.lora_B).sum(-1)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)


def pack_adapter(model: CausalLM, kind: Callable[[torch.Tensor, torch.Tensor, list | None], AdapterKernel]) -> int:
    """Give every adapter of a frozen model its delta by `kind(scaling * A, B, blocks)` (e.g. models/panel.py's
    `PanelLoRA`): for the few MASK rows of a decode step, the generic path's gather, two products, add and
    scatter cost a compiled R-ISD step one graph call each per projection group; one kernel call does them all.
    Returns how many."""
    mods = [m for m in model.modules() if isinstance(m, LoRAProj)]
    if any(m.lora_A.requires_grad or m.lora_B.requires_grad for m in mods):
        raise ValueError("pack_adapter is for frozen inference models (call requires_grad_(False) first)")
    with torch.no_grad():
        for m in mods:
            m.delta_kernel = kind(m.lora_A * m.scaling, m.lora_B, m.blocks)
    return len(mods)


@dataclass
class AdapterConfig:
    r: int = 32
    lora_alpha: float = 64.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    gated: bool = True
    mask_token_id: int | None = None
    draft_len: int | None = None  # b = N - 1 MASKs per training block
    trained_stride: int | None = None
    base_model_name_or_path: str | None = None
    acceptance: list[float] | None = None  # held-out greedy acceptance by draft position (adaptive decoding's prior)

    def to_json(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d.update(peft_type="LORA", task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", fan_in_fan_out=False)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "AdapterConfig":
        targets = d.get("target_modules") or DEFAULT_TARGETS
        if isinstance(targets, str):  # PEFT allows a regex / "all-linear"
            targets = DEFAULT_TARGETS
        return cls(
            r=int(d["r"]),
            lora_alpha=float(d.get("lora_alpha", d["r"])),
            target_modules=tuple(targets),
            gated=bool(d.get("gated", False)),
            mask_token_id=d.get("mask_token_id"),
            draft_len=d.get("draft_len", d.get("block_size")),
            trained_stride=d.get("trained_stride"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            acceptance=[float(a) for a in d["acceptance"]] if d.get("acceptance") else None,
        )

    @property
    def has_idlm_fields(self) -> bool:
        return self.draft_len is not None or self.trained_stride is not None


def add_lora(model: CausalLM, cfg: AdapterConfig) -> list[LoRAProj]:
    """Wrap every targeted projection of every layer; returns the new modules."""
    added = []
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in cfg.target_modules and isinstance(child, Proj) and not isinstance(child, LoRAProj):
                    wrapped = LoRAProj(child, cfg.r, cfg.lora_alpha)
                    setattr(parent, name, wrapped)
                    added.append(wrapped)
    if not added:
        raise ValueError(f"no projection matches target_modules {cfg.target_modules}")
    model.init_mask_embedding()
    return added


def lora_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT names (+ the MASK embedding when it is an extra vector)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAProj):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach()
    if model.mask_embedding is not None:
        out[MASK_KEY] = model.mask_embedding.detach()
    return out


def save_adapter(model: CausalLM, cfg: AdapterConfig, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write the model's adapter directory atomically (temp dir + rename)."""
    write_adapter(lora_state_dict(model), cfg, path, dtype)


def write_adapter(
    tensors: dict[str, torch.Tensor], cfg: AdapterConfig, path: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Write adapter tensors (`lora_state_dict` names) and config as a directory, atomically."""
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in tensors.items()}

    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_model.safetensors").chmod(0o644)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg.to_json(), indent=2))

    publish_dir(Path(path), build)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {path}")
    d = json.loads(f.read_text())
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {path} is {d.get('peft_type')}, only LORA is supported")
    return AdapterConfig.from_json(d)


def load_adapter(model: CausalLM, path: str | Path, rank: int | None = None, alpha: float | None = None
                 ) -> AdapterConfig:
    """Attach the adapter at `path` to `model` (frozen, inference). With `rank` (at least the stored one) and
    `alpha`, attach it grown to that rank for further training: the stored A fills the first rows (the rest keep
    their random init), the stored B the first columns rescaled to the new alpha / rank, the rest zero, so the
    model computes exactly what the stored adapter computes until training moves the new rank."""
    cfg = read_adapter_config(path)
    wfile = Path(path) / "adapter_model.safetensors"
    if not wfile.is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {path}")
    if rank is not None and rank < cfg.r:
        raise ValueError(f"adapter {path} has rank {cfg.r}; it can grow to {rank}, not shrink")
    stored_scaling = cfg.lora_alpha / cfg.r
    if rank is not None:
        cfg = replace(cfg, r=rank, lora_alpha=cfg.lora_alpha if alpha is None else alpha)
    state = load_file(str(wfile))
    add_lora(model, cfg)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, LoRAProj)}
    with torch.no_grad():
        for name, mod in modules.items():
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{name}.{part}.weight"
                alt = f"{PEFT_PREFIX}{name}.{part}.default.weight"
                t = state.get(key, state.get(alt))
                if t is None:
                    raise KeyError(f"adapter {path} lacks {key}")
                if part == "lora_A":
                    mod.lora_A[: t.shape[0]].copy_(t)
                else:
                    mod.lora_B.zero_()[:, : t.shape[1]].copy_(t * (stored_scaling / mod.scaling))
        if MASK_KEY in state:
            if model.mask_embedding is not None:
                model.mask_embedding.copy_(state[MASK_KEY])
            else:  # MASK is a row of the vocabulary: the adapter carries its trained embedding
                model.model.embed_tokens.weight[model.mask_token_id].copy_(state[MASK_KEY])
    model.requires_grad_(False)
    return cfg
