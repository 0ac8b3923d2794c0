"""Compiled serving forwards: one inductor graph per step class, our packed kernels kept as opaque calls inside it.

What the compiler takes: everything between the products (embedding, RMSNorm, RoPE, the q/k/v split, SiLU
times up, residual adds, the gated adapter's gather / small products / scatter), which eager PyTorch runs as
some 40 small ops per layer, each paying dispatch overhead. The quantized kernels (models/quantize.py, int8 and
int4: plain tensors and aten ops, `traceable`) are traced into the graph, their bf16 casts included (with
`emulate_precision_casts`, so the compiler keeps the round trips that define the quantized model), and so is the
float32 panel kernel (models/panel.py: plain tensors and one registered operator). What it must
not take: oneDNN-packed weights (opaque tensors, models/llama.py PackedLinear), which enter as the custom op
`idlm::kernel`, whose implementation looks the kernel up by an integer handle.

The paged attention: a step whose sequences attend as one group (every decode step, batched or not, and a
prefill alone) is traced too: its metadata tensors are graph inputs (`PagedAttention.graph_inputs`), so the KV
write, the block gather and the masking around the SDPA kernel are fused into the graph's own loops (the pool is
written in place). Steps call our attention kernel inside the graph where it is loaded (models/attention.py,
`kernel_fits`); without it, the graphs of AR steps (one row per sequence) attend by multiply-and-sum instead of the
SDPA kernel (`attention.SUMS_QUERY`): the compiler then reads the keys and values from the pool inside its own loops,
and the steps took 0.86-0.92x the time in int8 and 0.92-0.99x in fp32 (in one process, alternating; at 4-7 rows
1.08x, so those keep the kernel). Measured in an interleaved A/B on the embedded model (batch 1, 5 prompts x 128
tokens): steps 0.90x (int4 AR), 0.95x (int4 R-ISD), 0.96-0.97x (fp32); as an opaque call, 30 per step, attention
took 1.4 ms of a 7.2 ms int4 AR step, most of it dispatch. A step with a prefill chunk beside other sequences
(several groups) calls the attention as the custom op `idlm::attend` instead, which looks the step's backend up by
the handle.

Guards: the model is frozen once the engine starts, so the guards the compiler would check on every call
about the model (about 5,800 on the embedded one: every module's hook dicts, every kernel's attributes) are
filtered out; those on the step's inputs (row counts, the gate kind) stay, and each graph checks the handle of
the instance it was traced for (instances share the code object). Measured on an int4 AR step: the per-call
lookup 2.1 -> 0.85 ms.

Floats: the model's float attributes (each RMSNorm's eps, each adapter's scaling) are compiled as constants
(`specialize_float` while the graph is looked up or traced). Left as graph inputs, each became a tensor built on
every call, 61 per AR step and 117 per R-ISD step: measured in an interleaved A/B on the embedded model, fp32,
steps 0.96x (AR) and 0.95x (R-ISD) with them constant.

Checks: the generated code's own checks of every input's and every external kernel's size, stride and alignment
(`size_asserts` and its kin, some 520 per step) are off: the step inputs' sizes are guarded, the model is frozen,
and our operators return contiguous tensors as their shape functions declare. Measured on the embedded model, int8
AR, alternating processes: steps 7.9 ms against 9.0 ms with them (2026-12-05, AVX-512 EPYC). (A C++ wrapper in
place of the Python one, `cpp_wrapper`, took the step to 7.6 ms but one step class three minutes to compile: not
taken.) And a pointwise result of more than 16 ops (`realize_opcount_threshold`; the CPU default is 50) is stored
once rather than recomputed inside every loop that reads it: the queries' RoPE was recomputed once per key inside an
AR step's attention loop (int8 AR steps 0.95-0.96x the time, two engines in one process, alternating).

Inputs: the model's tensors (parameters, buffers, the kernels' packed weights) are marked static addresses with a
guard, and parameters among them taken as such (`prepare_freezing`), so the compiler installs them as attributes of
each graph instead of inputs fetched from the model by the code that runs before every call (1,389 tensors on the
embedded int8 model, each an attribute chain from `self.model`; the guards that would check them are among those
filtered out above). Measured on the embedded model, two engines in one process, alternating: int8 AR steps 0.95x
the time, fp32 R-ISD steps 0.96x (2026-12-05, AVX-512 EPYC). The graphs read the model's tensors themselves, not
copies: no extra memory, and the model must stay frozen (as it is once its kernels are final).

Shapes: static, except every dim of the step's input tensors (rows, gated rows, batch, blocks, keys), marked
dynamic per call. With every size dynamic, the model's own tensors' sizes became symbols too, and their relations
~970 guards evaluated in Python per call (A/B: int4 AR step 0.98x without them). PyTorch specializes sizes of 1, so
a step class is: one row or several, one sequence or several, the gate kind (none, all rows, chosen rows), the
attention traced or opaque; the count of gated rows is marked unbacked (never specialized: one MASK row, stride 2
alone, shares the graph of many). No step recompiles once its class has been seen (`LLM.warm_up` shows each).
Devices without our CPU kernels trace the plain F.linear, which the compiler then lowers itself.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass

from idlm.models.attention import AttentionBackend, PagedAttention
from idlm.models.llama import CausalLM, Proj, RowGate

_owners: "weakref.WeakValueDictionary[int, CompiledForward]" = weakref.WeakValueDictionary()
_handles = itertools.count()

_lib = torch.library.Library("idlm", "DEF")
_lib.define("kernel(Tensor x, int owner, int index, int out_features) -> Tensor")
_lib.define("attend(Tensor q, Tensor k, Tensor v, int owner, int layer) -> Tensor")


def _kernel(x: Tensor, owner: int, index: int, out_features: int) -> Tensor:  # noqa: ARG001
    return _owners[owner].kernels[index](x).contiguous()


def _attend(q: Tensor, k: Tensor, v: Tensor, owner: int, layer: int) -> Tensor:
    attn = _owners[owner].attn
    if attn is None:
        raise RuntimeError("idlm::attend called outside a CompiledForward call")
    return attn.attend(layer, q, k, v).contiguous()


_lib.impl("kernel", _kernel, "CompositeExplicitAutograd")
_lib.impl("attend", _attend, "CompositeExplicitAutograd")


@torch.library.register_fake("idlm::kernel")
def _kernel_shape(x: Tensor, owner: int, index: int, out_features: int) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("idlm::attend")
def _attend_shape(q: Tensor, k: Tensor, v: Tensor, owner: int, layer: int) -> Tensor:  # noqa: ARG001
    return q.new_empty(q.shape)


class OpaqueKernel:
    """A projection's kernel as the compiler sees it: one `idlm::kernel` call, or for a traceable (quantized)
    kernel its own ops at the graph's row limit (eager: the kernel itself)."""

    def __init__(self, owner: int, index: int, out_features: int, inner: Callable[..., Tensor],
                 row_limit: int | None = None):
        self.owner, self.index, self.out_features, self.inner = owner, index, out_features, inner
        self.row_limit = row_limit
        # a kernel that adds an adapter's delta inside its own call (models/lora.py) is traced as that call
        self.fused = getattr(inner, "fused", None) if getattr(inner, "traceable", False) else None

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if getattr(self.inner, "traceable", False):  # its own ops; a quantized one at the graph's row limit
                return self.inner(x, row_limit=self.row_limit) if hasattr(self.inner, "row_limit") else self.inner(x)
            return torch.ops.idlm.kernel(x, self.owner, self.index, self.out_features)
        return self.inner(x)


class _OpaqueAttention:
    """The attention backend inside a graph of a step of several groups: the step's real backend is looked up
    when the graph runs."""

    def __init__(self, owner: int):
        self.owner = owner

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.ops.idlm.attend(q, k, v, self.owner, layer_idx)


def _guards_off_the_model(entries) -> list[bool]:
    """Keep the guards on the step's inputs and on which model this is (graphs of several engines share one code
    object); drop those on what is inside the model."""
    return [e.name == "self.model" or "self.model" not in e.name for e in entries]


class _CacheTag(CustomGraphPass):
    """A graph pass that changes nothing: its uuid is part of the compile caches' keys. The graphs of two engines
    whose quantized kernels branch at different row limits can be one graph (past the limit both run the dense
    product), and a graph found in the cache brings the row bound of the compile that stored it: an int8 engine
    (limit 24) that found an int4 engine's graph (limit 48) took the bound "rows >= 49" with it and compiled again
    for 25-48 rows after its warm-up (test_compile's no-recompile test, the int4 case before the int8 one)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        return None

    def uuid(self) -> str:
        return self.tag


class CompiledForward:
    """`model(input_ids [T], positions [T], attn, lora_gate)` for serving, compiled (see the module doc).

    Wraps the model's projection kernels in place (eager calls are unchanged), so build it after the model's
    kernels are final (fusing, int8, packing)."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.handle = next(_handles)
        _owners[self.handle] = self
        self.attn: AttentionBackend | None = None
        projs = [m for m in model.modules() if isinstance(m, Proj) and m.kernel is not None]
        self.kernels: list[Callable[..., Tensor]] = [m.kernel.inner if isinstance(m.kernel, OpaqueKernel)
                                                     else m.kernel for m in projs]
        # a traced quantized kernel branches on the step's row count (its row limit): one boundary per distinct
        # limit would split every shape class again (measured int8 limits 4 / 8 / 16: four classes per gate
        # kind, past the recompile limit). One limit for the whole graph, the largest measured: between a
        # kernel's own limit and it, that kernel is somewhat slower than the dense path, never another model.
        # Eager calls keep each kernel's own limit.
        self.row_limit = max((k.row_limit for k in self.kernels if getattr(k, "row_limit", None) is not None),
                             default=None)
        for i, (m, inner) in enumerate(zip(projs, self.kernels)):
            m.kernel = OpaqueKernel(self.handle, i, m.out_features, inner, self.row_limit)
        # the model's tensors are attributes of each graph, not inputs: fetched from the model on every call, they
        # cost ~1,400 attribute chains of Python per step (see "Inputs" in the module doc)
        for t in _model_tensors(model, set()):
            torch._dynamo.mark_static_address(t, guard=True)
        self._backend = _OpaqueAttention(self.handle)
        # the compiler caches graphs per code object, and every instance compiles the same `_forward` (a process
        # may hold several engines: benchmarks, tests): room for ~16 step classes per instance ever made (the
        # graphs of a collected instance stay in the code object's cache)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), 16 * (self.handle + 2)))
        # the model is frozen once its kernels are final: of the ~5,800 guards the compiler would check on every
        # call (every module's hook dicts, every kernel's attributes), keep only those on the step's inputs
        options = {"guard_filter_fn": _guards_off_the_model} if hasattr(torch.compiler, "skip_guard_on_globals_unsafe") \
            else {}  # a torch without guard filters checks them all
        # the quantized kernels round their inputs and outputs to bf16 (models/quantize.py); the compiler would
        # otherwise drop a float32 -> bf16 -> float32 round trip as a no-op and compute another model
        options["emulate_precision_casts"] = True
        from torch._inductor import config as inductor_config
        tuned = {
            # the generated code checks the size and stride of every input and of every external kernel's output on
            # each call (some 520 checks per int8 AR step: 0.37 ms under cProfile); the inputs' sizes are guarded,
            # the model's tensors frozen, and our operators' outputs contiguous as their shape functions say
            "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
            # a pointwise result of more than this many ops is stored once, not recomputed inside each loop that
            # reads it (the CPU default, 50, let an AR step's attention recompute the queries' RoPE, sines and
            # cosines, once per key): int8 AR steps 0.95-0.96x the time, fp32 R-ISD steps unchanged
            "realize_opcount_threshold": 16,
        }
        options.update({name: value for name, value in tuned.items() if hasattr(inductor_config, name)})
        if self.row_limit is not None and hasattr(inductor_config, "post_grad_custom_post_pass"):
            options["post_grad_custom_post_pass"] = _CacheTag(f"idlm row limit {self.row_limit}")
        # static sizes but the step's inputs' (`_mark_dynamic`; see "Shapes" in the module doc)
        self._compiled = torch.compile(self._forward, dynamic=False, fullgraph=True, options=options)
        # while a graph is looked up or traced: the model's floats (RMSNorm eps, adapter scalings) are constants of
        # the frozen model, not graph inputs (a torch without the option specializes them anyway), and its static
        # tensors, parameters included, are attributes of the graph (see "Inputs" in the module doc)
        self._tracing = config.patch(**{name: True for name in ("specialize_float", "prepare_freezing")
                                        if hasattr(config, name)})

    def _forward(self, input_ids: Tensor, positions: Tensor, lora_gate, paged: tuple | None, owner: int) -> Tensor:
        # instances share this code object, and the guards inside the model are filtered out: comparing the handle
        # makes it a guarded constant of each graph, so no engine runs a graph traced on another's kernels
        if owner != self.handle:
            raise RuntimeError("a compiled graph ran for another CompiledForward")
        attn = self._backend if paged is None else PagedAttention.from_graph_inputs(*paged)
        return self.model(input_ids, positions, attn, lora_gate=lora_gate)

    def __call__(self, input_ids: Tensor, positions: Tensor, attn: AttentionBackend,
                 lora_gate: Tensor | None | object = None) -> Tensor:
        if isinstance(lora_gate, Tensor):
            lora_gate = RowGate.from_mask(lora_gate)
        if isinstance(lora_gate, RowGate) and lora_gate.span is not None:
            lora_gate = RowGate(lora_gate.rows)  # span bounds would be guarded as constants: one graph per span
        if isinstance(lora_gate, RowGate):  # one MASK row (stride 2 alone) would otherwise get a graph of its own
            torch._dynamo.decorators.mark_unbacked(lora_gate.rows, 0)
        paged = attn.graph_inputs() if isinstance(attn, PagedAttention) else None
        _mark_dynamic(input_ids, positions)
        if paged is not None:
            _mark_dynamic(*paged[2:-1])  # the step's tensors (the last input is a bool)
        self.attn = None if paged is not None else attn
        try:
            with self._tracing:
                return self._compiled(input_ids, positions, lora_gate, paged, self.handle)
        finally:
            self.attn = None


def _model_tensors(obj, seen: set[int]) -> Iterator[Tensor]:
    """Every tensor a model holds: its parameters and buffers, and the tensors of its kernels (our plain objects)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
        return
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("idlm."):
        items = vars(obj).values()
    else:
        return
    for item in items:
        yield from _model_tensors(item, seen)


def _mark_dynamic(*tensors: Tensor | None) -> None:
    """Every dim of a step's input tensors is a symbol, except sizes of 1, which PyTorch specializes (a 1-row step
    gets its own graph anyway); the model's own tensors keep static sizes."""
    for t in tensors:
        if t is not None:
            for dim, size in enumerate(t.shape):
                if size > 1:
                    torch._dynamo.mark_dynamic(t, dim)
