"""`idlm train`: AR -> I-DLM conversion with the all-masked objective (full fine-tune, LoRA, gated LoRA).

One loop, readable top to bottom (`Trainer.train`):
  data order (a pure function of the global sample index)  ->  `[x_t | x_0]` batches  ->  loss  ->
  gradient accumulation  ->  clip, AdamW, warmup + cosine  ->  log / evaluate (ISD) / checkpoint.

Runs on one CPU or GPU, or under `torchrun` / `accelerate launch` (DDP or FSDP over torch.distributed: gloo
on CPU, nccl on GPU; see `parallel.py`); every rank takes its slice of each step's global batch, so the loss
curve does not depend on how the global batch is split. Checkpoints are written atomically (temp dir + rename) with the trainable
weights, optimizer, scheduler, RNG states and step; `--resume` continues exactly. SIGINT / SIGTERM finish
the current optimizer step, save a checkpoint and return.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from idlm.config import ModelConfig
from idlm.eval.acceptance import evaluate_isd, load_eval_prompts
from idlm.models.llama import CausalLM
from idlm.models.lora import (
    MASK_KEY, AdapterConfig, LoRAProj, add_lora, load_adapter, lora_state_dict, read_adapter_config, write_adapter,
)
from idlm.training.checkpoints import Checkpoints, export_full_model, rng_state
from idlm.training.config import TrainConfig
from idlm.training.data import SampleOrder, TokenizedExample, load_examples, step_indices
from idlm.training.objective import (
    AllMaskedLoss, LossConfig, build_example, build_gated_example, collate, collate_gated,
)
from idlm.training.parallel import DataParallel, Dist, full_tensor, like_param

log = logging.getLogger("idlm.train")


def cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16): where bf16 autocast pays."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))

CKPT_DIR = "checkpoints"
INTERRUPTED = 130


class TrainingError(ValueError):
    """A run that cannot start or continue (shown as one line by the CLI)."""


# ---- model ----------------------------------------------------------------------------------------
def random_model(hf_config: dict[str, Any], seed: int) -> CausalLM:
    """A randomly initialised native model (tests, toy languages): normal(0, 0.02) weights, unit norms."""
    cfg = ModelConfig.from_hf(hf_config)
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    return model


def load_base(cfg: TrainConfig, device: torch.device) -> tuple[CausalLM, Any, list[int], dict[str, Any]]:
    """(model in fp32, tokenizer or None, eos ids, HF config dict) for the configured base model."""
    if cfg.model == "random":
        hf = dict(cfg.model_config or {})
        model = random_model(hf, cfg.seed).to(device)
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [int(eos)])
        return model, None, eos_ids, hf
    from idlm.loading import load_checkpoint

    ckpt = load_checkpoint(cfg.model, torch.float32, device)
    hf = json.loads((Path(ckpt.path) / "config.json").read_text())
    return ckpt.model, ckpt.tokenizer, list(ckpt.eos_token_ids), hf


def prepare_model(model: CausalLM, cfg: TrainConfig) -> tuple[AdapterConfig | None, str]:
    """Freeze / wrap the model for the configured mode; returns (adapter config, lora gate mode)."""
    torch.manual_seed(cfg.seed + 1)
    if cfg.mode == "full":
        if model.mask_embedding is None:
            model.init_mask_embedding()
        model.requires_grad_(True)
        return None, "none"
    model.requires_grad_(False)
    acfg = AdapterConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=tuple(cfg.lora.targets),
        gated=cfg.mode == "gated_lora",
        mask_token_id=model.mask_token_id,
        draft_len=cfg.draft_len,
        trained_stride=cfg.stride,
        base_model_name_or_path=cfg.model if cfg.model != "random" else None,
    )
    if cfg.lora.init:  # continue an adapter: its targets and gating must be the configured ones, its rank at most
        init = read_adapter_config(cfg.lora.init)
        have = (sorted(init.target_modules), init.gated, init.draft_len)
        want = (sorted(acfg.target_modules), acfg.gated, acfg.draft_len)
        if have != want or init.r > acfg.r:
            raise TrainingError(f"lora.init {cfg.lora.init}: (targets, gated, draft_len) {have}, rank {init.r}; "
                                f"the config has {want}, rank {acfg.r} (a rank can grow, not shrink)")
        load_adapter(model, cfg.lora.init, rank=acfg.r, alpha=acfg.lora_alpha)  # its MASK embedding too
    else:
        add_lora(model, acfg)  # keeps an extra MASK embedding the checkpoint already trained
    for mod in model.modules():
        if isinstance(mod, LoRAProj):
            mod.lora_A.requires_grad_(True)
            mod.lora_B.requires_grad_(True)
    if model.mask_embedding is not None:
        model.mask_embedding.requires_grad_(True)
    else:  # the checkpoint's MASK id is a row of the embedding: train that row only (see mask_row_grad)
        model.model.embed_tokens.weight.requires_grad_(True)
    return acfg, "gated" if acfg.gated else "all"


def mask_row_grad(model: CausalLM, mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embedding weight, 0/1 row mask) when LoRA modes train only the in-vocab MASK row of the embedding;
    the loop multiplies that gradient by the mask before clipping (sharded like the weight under FSDP)."""
    w = model.model.embed_tokens.weight
    if mode == "full" or not w.requires_grad:
        return None
    row = torch.zeros(w.shape[0], 1, dtype=w.dtype)
    row[model.mask_token_id] = 1
    return w, like_param(row, w)  # [V, 1]: broadcasts over the row; same row split as the weight under FSDP


# ---- schedule -----------------------------------------------------------------------------------
def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Build everything from a TrainConfig; `train()` runs (or resumes) the loop and exports the result."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, on_step: Callable[[int, dict], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.resume = resume
        self.on_step = on_step
        self.out = Path(cfg.output_dir)
        self.checkpoints = Checkpoints(self.out / CKPT_DIR, cfg.keep_checkpoints)
        self.dist = Dist(cfg.device)
        self.device = self.dist.device
        self._stop = False
        self._signals = 0

    # -- setup
    def _setup(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model, self.tokenizer, self.eos_ids, self.hf_config = load_base(cfg, device)
        self.model = model.float()
        self.adapter_cfg, lora_mode = prepare_model(self.model, cfg)
        self.model.to(device).train()
        gated = cfg.mode == "gated_lora"
        self.loss_mod = AllMaskedLoss(
            self.model, LossConfig(cfg.alpha, cfg.loss_auto_balance, gated=gated, position_decay=cfg.position_decay,
                                   soft_weight=cfg.soft_weight, soft_kind=cfg.soft_kind,
                                   soft_teacher=cfg.soft_teacher, soft_top_k=cfg.soft_top_k), lora_mode=lora_mode
        )
        self.lora_mode = lora_mode
        self.parallel = DataParallel(cfg.parallel, self.dist, self.model, self.loss_mod)
        self.mask_row = mask_row_grad(self.model, cfg.mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("nothing to train: no parameter requires a gradient")
        self.examples: list[TokenizedExample] = load_examples(
            cfg.data.train, self.tokenizer, self.eos_ids, cfg.data.max_len, cfg.data.min_response
        )
        # a sample's size: the gated two-pass objective's backward runs over the response rows alone
        sizes = [(e.num_response, len(e.ids)) if cfg.mode == "gated_lora" else len(e.ids) for e in self.examples]
        self.order = SampleOrder(len(self.examples), cfg.seed, cfg.data.shuffle, sizes, cfg.data.group_by_length,
                                 cfg.micro_batch_size)
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * self.dist.world
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * len(self.examples) / self.global_batch))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.total_steps)
        fused = device.type == "cuda"
        # the embedding matrix is trainable in LoRA modes only for its in-vocab MASK row: never decay the rest
        no_decay = [p for n, p in self.model.named_parameters()
                    if p.requires_grad and n == "model.embed_tokens.weight" and cfg.mode != "full"]
        decay = [p for p in self.params if all(p is not q for q in no_decay)]
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        self.opt = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=not fused, fused=fused
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.total_steps, warmup, cfg.min_lr_ratio))
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        if bf16 and device.type == "cpu" and not cpu_has_bf16_products():
            log.warning("precision bf16 on a CPU without native bf16 products (no AMX, no AVX512-BF16): measured "
                        "about 20x slower than fp32 (docs/training.md); set precision: fp32")
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        )
        self.step = 0
        self.tokens_seen = 0
        if self.resume:
            self._load_checkpoint()

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        """Every rank writes its RNG state into the staged directory; rank 0 adds the state and publishes it."""
        if self.dist.main:
            self.checkpoints.stage(self.step)
        self.dist.barrier()
        torch.save(rng_state(), self.checkpoints.rng_file(self.checkpoints.staged(self.step), self.dist.rank))
        trainable = self.parallel.trainable_state()  # collective under FSDP
        optimizer = self.parallel.optimizer_state(self.opt)
        self.dist.barrier()
        if self.dist.main:
            self.checkpoints.publish(self.step, {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "samples_consumed": self.step * self.global_batch,
                "world_size": self.dist.world,
                "global_batch": self.global_batch,
                "trainable": trainable,
                "optimizer": optimizer,
                "parallel": self.parallel.kind,
                "scheduler": self.sched.state_dict(),
                "config": self.cfg.to_dict(),
            })
        self.dist.barrier()
        return self.checkpoints.path(self.step)

    def _load_checkpoint(self) -> None:
        found = self.checkpoints.load()
        if found is None:
            raise TrainingError(f"--resume: no checkpoint under {self.checkpoints.root}")
        state, path = found
        if state["global_batch"] != self.global_batch:
            raise TrainingError(
                f"--resume: checkpoint has global batch {state['global_batch']}, this run {self.global_batch} "
                "(micro_batch_size x grad_accum x processes must match to continue the same data order)"
            )
        if state.get("parallel", "none") != self.parallel.kind and "fsdp" in (state.get("parallel"), self.parallel.kind):
            raise TrainingError(
                f"--resume: checkpoint was written with parallel={state.get('parallel')}, this run uses "
                f"{self.parallel.kind} (optimizer state layouts differ)"
            )
        try:
            self.parallel.load_trainable_state(state["trainable"])
        except KeyError as e:
            raise TrainingError(f"--resume: checkpoint weight {e.args[0]} does not exist in this model") from None
        self.parallel.load_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.checkpoints.restore_rng(path, self.dist.rank)
        if self.dist.main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -- logs
    def _metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    def _truncate_metrics(self, step: int) -> None:
        f = self._metrics_file()
        if not f.is_file():
            return
        keep = [l for l in f.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        f.write_text("".join(l + "\n" for l in keep))

    def _write_metrics(self, rec: dict[str, Any]) -> None:
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with self._metrics_file().open("a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- signals
    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        self._stop = True
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint (again to abort)", file=sys.stderr)

    @contextlib.contextmanager
    def _signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- evaluation
    def evaluate(self) -> dict[str, Any] | None:
        e = self.cfg.eval
        if not self.dist.main and not self.parallel.sharded:  # sharded forwards need every rank
            return None
        prompts = load_eval_prompts(e.prompts, self.tokenizer, e.num_prompts)
        if not prompts:
            log.warning("held-out ISD evaluation skipped: no usable prompts")
            return None
        return evaluate_isd(
            self.model, self.tokenizer, self.eos_ids, prompts, e.stride or self.cfg.stride, e.max_tokens, self.lora_mode
        )

    def _logged_evaluation(self) -> dict[str, Any] | None:
        """Evaluate (every rank that must), then on rank 0 write the record at this step and return it."""
        ev = self.evaluate()
        self.dist.barrier()
        if ev is None or not self.dist.main:
            return None
        ev["step"] = self.step
        self._write_metrics({"step": self.step, "eval": ev})
        from tqdm import tqdm  # written above a running progress bar, not through it

        tqdm.write(f"step {self.step}: ISD TPF {ev['tokens_per_forward']:.3f}, acceptance by position "
                   f"{ev['acceptance_by_position']}", file=sys.stderr)
        return ev

    # -- the loop
    def _micro_batch(self, micro: int):
        cfg = self.cfg
        idx = step_indices(self.step, micro, self.dist.rank, self.dist.world, cfg.micro_batch_size, cfg.grad_accum)
        mask_id = self.model.mask_token_id
        exs = [self.examples[self.order[i]] for i in idx]
        pad = self.eos_ids[0] if self.eos_ids else 0
        b = cfg.draft_len_at(self.step)
        if cfg.mode == "gated_lora":  # the two-pass form: same loss and gradients, fewer rows
            return collate_gated([build_gated_example(e.ids, e.prompt_len, mask_id, b) for e in exs], pad)
        return collate([build_example(e.ids, e.prompt_len, mask_id, b) for e in exs], pad_id=pad)

    def train(self) -> dict[str, Any]:
        """Run to the last step (or until a signal); returns a summary dict. Exported weights on completion."""
        clean = False
        try:
            with self._signal_handlers():
                self._setup()
                summary = self._loop()
                clean = True
                return summary
        finally:
            self.dist.close(synchronize=clean)

    def _loop(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        module = self.parallel.module
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            file=sys.stderr,
            disable=not (self.dist.main and cfg.progress),
            dynamic_ncols=True,
            desc=f"train {cfg.mode}",
            unit="step",
        )
        evals: list[dict[str, Any]] = []
        started = time.perf_counter()
        tokens_at_start = self.tokens_seen
        interrupted = False
        last: dict[str, Any] = {}
        if cfg.eval.at_start and self.step == 0 and (ev := self._logged_evaluation()):
            evals.append(ev)
        while self.step < self.total_steps:
            sums = {"loss": 0.0, "task": 0.0, "clean": 0.0, "soft": 0.0}
            ntok = 0
            for micro in range(cfg.grad_accum):
                batch = self._micro_batch(micro).to(self.device)
                ntok += batch.num_tokens
                with self.parallel.grad_sync(micro == cfg.grad_accum - 1):
                    with self.autocast():
                        out = module(batch)
                    (out["loss"] / cfg.grad_accum).backward()
                for k in sums:
                    if k in out:
                        sums[k] += float(out[k].detach()) / cfg.grad_accum
            if self.mask_row is not None and self.mask_row[0].grad is not None:
                self.mask_row[0].grad.mul_(self.mask_row[1])
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
                self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
            lr = self.sched.get_last_lr()[0]
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            loss, task, clean, soft, tok = self.dist.mean(
                [sums["loss"], sums["task"], sums["clean"], sums["soft"], float(ntok)])
            self.tokens_seen += int(round(tok * self.dist.world))
            elapsed = time.perf_counter() - started
            tps = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            last = {"step": self.step, "loss": loss, "task": task, "lr": lr, "grad_norm": float(grad_norm),
                    "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1)}
            if cfg.mode != "gated_lora":
                last["clean"] = clean
            if cfg.soft_weight > 0:
                last["soft"] = soft
            if cfg.draft_len_schedule:
                last["draft_len"] = cfg.draft_len_at(self.step - 1)
            if cfg.log_every and self.step % cfg.log_every == 0:
                self._write_metrics(last)
            bar.set_postfix(loss=f"{loss:.3f}", task=f"{task:.3f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            bar.update(1)
            if self.on_step is not None:
                self.on_step(self.step, last)
            stop = self.dist.any(self._stop)
            if (cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps and not stop
                    and (ev := self._logged_evaluation())):
                evals.append(ev)
            if stop:
                self.save_checkpoint()
                interrupted = True
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        summary: dict[str, Any] = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens_seen,
            "wall_s": round(time.perf_counter() - started, 1),
            "interrupted": interrupted,
            "last": last,
            "evals": evals,
        }
        if interrupted:
            return summary
        self.save_checkpoint()
        if cfg.eval.at_end and (ev := self._logged_evaluation()):
            summary["final_eval"] = ev
        self.dist.barrier()
        output = self.export()  # every rank gathers, rank 0 writes
        if self.dist.main:
            summary["output"] = str(output)
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def export(self) -> Path:
        """The adapter (LoRA modes) or the full HF-layout model; gathered on every rank, written by rank 0."""
        dtype = torch.bfloat16 if self.cfg.save_dtype == "bfloat16" else torch.float32
        if self.cfg.mode == "full":
            path = self.out / "model"
            state = {n: full_tensor(p.detach()) for n, p in self.model.named_parameters()}
            if self.model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            if self.dist.main:
                export_full_model(state, self.model.mask_token_id, self.hf_config, self.tokenizer,
                                  self.cfg.draft_len, path, dtype)
            return path
        path = self.out / "adapter"
        tensors = {k: full_tensor(v) for k, v in lora_state_dict(self.model).items()}
        if self.mask_row is not None:  # trained in-vocab MASK row
            tensors[MASK_KEY] = full_tensor(self.mask_row[0].detach())[self.model.mask_token_id]
        if self.dist.main:
            write_adapter(tensors, self.adapter_cfg, path, dtype)
        return path


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, on_step=on_step).train()
