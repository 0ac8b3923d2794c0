"""Data parallelism for `idlm train`: the process group from the launcher, and DDP or FSDP over the model.

DDP replicates the model on every rank and all-reduces gradients. FSDP (torch's `fully_shard`, one unit
per decoder layer plus the root for embeddings / norm / head) shards parameters, gradients and optimizer
state across ranks, for models that do not fit one device. Both take the same per-rank slice of each
global batch, so the loss curve does not depend on the strategy or the number of ranks.

Under FSDP every parameter is a sharded DTensor: gathering full tensors (checkpoints, export) and held-out
evaluation (forwards all-gather layer by layer) are collective, so every rank takes part.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


class Dist:
    """Rank / world size from the launcher's environment (torchrun and accelerate set RANK, WORLD_SIZE)."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch sees no CUDA device")
        if want_cuda:
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
            self.owns_group = True
        self.enabled = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def close(self, synchronize: bool = True) -> None:
        """Leave the process group; `synchronize` (a clean end on every rank) waits for all ranks first: gloo
        aborts a process whose group is destroyed while a peer still talks to it (seen as a rare SIGABRT)."""
        if self.owns_group and dist.is_initialized():
            if synchronize and self.enabled:
                dist.barrier()
            dist.destroy_process_group()


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; collective for a DTensor."""
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (the param's full shape, or [rows, 1] to broadcast over a row-sharded param) laid out like
    `param`: split the same way along dim 0 when `param` is a DTensor."""
    value = value.to(device=param.device, dtype=param.dtype)
    if isinstance(param, _dtensor_type()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


class DataParallel:
    """One strategy object for the loop: the module to call, gradient-sync control, full states."""

    def __init__(self, kind: str, dist_: Dist, model: nn.Module, loss_mod: nn.Module):
        if kind not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {kind!r}")
        self.kind = kind if dist_.enabled else "none"
        self.model = model
        self.module = loss_mod
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist_.device.index] if dist_.device.type == "cuda" else None
            self.module = DDP(loss_mod, device_ids=ids)
        elif self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard
            mesh = init_device_mesh(dist_.device.type, (dist_.world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the root keeps its params gathered between forward and loss

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the step's last."""
        if enabled or self.kind == "none":
            yield
        elif self.kind == "ddp":
            with self.module.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full CPU copies of the trainable parameters (collective under FSDP)."""
        return {n: full_tensor(p.detach()).cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        missing = [k for k in state if k not in own]
        if missing:
            raise KeyError(missing[0])
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(like_param(v, own[k]))

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state, whole (collective under FSDP; only rank 0's copy is complete)."""
        if not self.sharded:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, opt, state, options=StateDictOptions(full_state_dict=True))
