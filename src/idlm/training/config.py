"""Training configuration: one YAML file, one dataclass. Unknown keys are an error (typos do not pass silently)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("full", "lora", "gated_lora")


class ConfigError(ValueError):
    """A training config that cannot be used."""


@dataclass
class LoRASection:
    r: int = 32
    alpha: float = 64.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    init: str | None = None  # start from this adapter dir (same r, alpha, targets, gating) instead of B = 0


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # JSONL files (relative to the config file's folder)
    max_len: int = 1024  # tokens per example (prompt + response), longer ones are cut
    min_response: int = 2
    shuffle: bool = True
    group_by_length: int = 0  # samples a window sorted by length into micro-batches (less padding); 0 = off


@dataclass
class EvalSection:
    every: int = 0  # optimizer steps between held-out ISD evaluations; 0 = only at the end
    prompts: str | None = None  # JSONL of chat prompts; default: the packaged held-out prompts
    num_prompts: int = 8
    max_tokens: int = 64
    stride: int | None = None  # default draft_len + 1
    at_start: bool = False  # also before the first step of a fresh run: the stage's starting point, same prompts
    at_end: bool = True


@dataclass
class TrainConfig:
    # model: a name or path for idlm.loading.load_checkpoint, or `random` with `model_config`
    model: str = "smollm2-135m"
    model_config: dict[str, Any] | None = None  # HF-style config.json dict for a random-init model (tests)
    mode: str = "gated_lora"  # full | lora | gated_lora
    lora: LoRASection = field(default_factory=LoRASection)
    draft_len: int = 3  # b = N - 1 MASK slots per training block (stride N = b + 1)
    # draft_len by step, the block-size curriculum: [[0, 1], [100, 2], [200, 3]] (last = draft_len; None: fixed)
    draft_len_schedule: list[list[int]] | None = None
    alpha: float = 0.2  # weight of the clean (AR) loss term
    loss_auto_balance: bool = False
    position_decay: float = 1.0  # task CE at draft index d weighted by position_decay ** d (objective.py)
    soft_weight: float = 0.0  # soft targets: share of KL/TV to the base model's distribution (gated_lora only)
    soft_kind: str = "kl"  # kl | tv
    soft_teacher: str = "clean"  # clean: the base row at the same position | marginal: x0[i] unknown (objective.py)
    soft_top_k: int = 4  # branches of the marginal teacher
    data: DataSection = field(default_factory=DataSection)
    # optimisation
    micro_batch_size: int = 1  # examples per forward per process
    grad_accum: int = 1
    max_steps: int = 0  # optimizer steps; 0 = `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    seed: int = 0
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # with several processes: ddp (replicas) | fsdp (sharded params, grads, optimizer)
    threads: int = 0  # CPU threads for torch (0 = torch's default); 1 wins on a shared, contended CPU
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    output_dir: str = "runs/idlm"
    save_every: int = 200  # optimizer steps between checkpoints; 0 = only at the end / on interrupt
    keep_checkpoints: int = 2
    log_every: int = 1
    save_dtype: str = "bfloat16"  # storage dtype of the exported adapter / model: bfloat16 | float32
    progress: bool = True
    eval: EvalSection = field(default_factory=EvalSection)
    source_path: str | None = None  # set by load_config: the YAML file it came from

    @property
    def stride(self) -> int:
        return self.draft_len + 1

    def draft_len_at(self, step: int) -> int:
        """The block size that optimizer step `step` (0-based) trains with."""
        if not self.draft_len_schedule:
            return self.draft_len
        return next(b for start, b in reversed(self.draft_len_schedule) if step >= start)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.draft_len < 1:
            raise ConfigError("draft_len must be >= 1")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("micro_batch_size and grad_accum must be >= 1")
        if not self.data.train:
            raise ConfigError("data.train lists no JSONL file")
        if self.data.group_by_length < 0 or self.data.group_by_length % self.micro_batch_size:
            raise ConfigError("data.group_by_length must be 0 (off) or a multiple of micro_batch_size")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set max_steps or epochs")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("precision must be auto, fp32 or bf16")
        if self.save_dtype not in ("bfloat16", "float32"):
            raise ConfigError("save_dtype must be bfloat16 or float32")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")
        if self.model == "random" and not self.model_config:
            raise ConfigError("model: random needs model_config")
        if self.draft_len_schedule is not None:
            sched = self.draft_len_schedule
            if (not sched or any(len(e) != 2 or e[1] < 1 for e in sched) or sched[0][0] != 0
                    or any(a[0] >= b[0] for a, b in zip(sched, sched[1:]))):
                raise ConfigError("draft_len_schedule must be [[0, b0], [step1, b1], ...] with rising steps and b >= 1")
            if sched[-1][1] != self.draft_len:
                raise ConfigError(f"draft_len_schedule ends at {sched[-1][1]}, draft_len is {self.draft_len}")
        if not 0.0 <= self.soft_weight <= 1.0 or self.soft_kind not in ("kl", "tv"):
            raise ConfigError("soft_weight must be in [0, 1] and soft_kind kl or tv")
        if self.soft_teacher not in ("clean", "marginal") or self.soft_top_k < 1:
            raise ConfigError("soft_teacher must be clean or marginal and soft_top_k >= 1")
        if self.soft_weight > 0 and self.mode != "gated_lora":
            raise ConfigError("soft targets (soft_weight > 0) need mode gated_lora (the two-pass objective)")
        if self.position_decay <= 0:
            raise ConfigError("position_decay must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, d: dict[str, Any], where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(cls)}
    if cls is TrainConfig and "block_size" in d and "draft_len" not in d:
        d = {("draft_len" if k == "block_size" else k): v for k, v in d.items()}  # configs from before the rename
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}")
    kw = {}
    for k, v in d.items():
        sub = {"lora": LoRASection, "data": DataSection, "eval": EvalSection}.get(k) if cls is TrainConfig else None
        if sub is not None:
            v = _build(sub, v, k)
        elif k == "train" and isinstance(v, str):
            v = [v]
        elif k == "betas":
            v = tuple(float(x) for x in v)
        kw[k] = v
    return cls(**kw)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    cfg = _build(TrainConfig, d, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; relative data / output paths are resolved against the current directory first,
    then against the config file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    for k, v in (overrides or {}).items():
        cur = d
        keys = k.split(".")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = v
    cfg = config_from_dict(d)
    cfg.source_path = str(p)
    cfg.data.train = [_resolve(t, p.parent) for t in cfg.data.train]
    if cfg.eval.prompts:
        cfg.eval.prompts = _resolve(cfg.eval.prompts, p.parent)
    return cfg


def _resolve(name: str, base: Path) -> str:
    q = Path(name)
    if q.is_absolute() or q.exists() or not (base / q).exists():
        return str(q)
    return str(base / q)
