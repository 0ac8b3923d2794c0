"""Compiled forwards (models/compile.py): the same greedy output as eager, R-ISD still AR's token for token, one
graph per step shape class (no recompiles from step to step), with the CPU kernels kept as opaque calls."""
from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import compile_fx

from idlm import LLM, SamplingParams
from idlm.decoding.adaptive import Adaptive
from idlm.models.attention import SHORT_QUERY, PagedAttention
from idlm.models import panel
from idlm.models.compile import OpaqueKernel
from idlm.models.quantize import quantize_model

from conftest import gated_tiny_model, random_prompts
from oracles import assert_same_tokens


def gated_tiny(kernels: str):
    model, cfg = gated_tiny_model()
    if kernels in ("panel", "int8 panel", "w8a8"):  # our panel kernels (models/panel.py), traced as one operator each
        if panel.available() and torch.backends.cpu.get_cpu_capability() not in panel.CAPABILITIES:
            pytest.skip(panel.available())
    if kernels == "int4":  # int4 projections, the int8 LM head: both quantized kernels
        quantize_model(model, "int4", row_limit=4)
    if kernels == "int8 panel":  # at every row count: no row limit
        quantize_model(model, "int8", panel=True)
    if kernels == "w8a8":
        quantize_model(model, "w8a8", panel=True)
    if kernels == "panel":
        model.pack_for_cpu_inference(panel.PanelLinear)
    elif kernels != "plain":
        model.pack_for_cpu_inference()
    return model, cfg


@pytest.mark.parametrize("kernels", ["plain", "packed", "panel", "int4", "int8 panel", "w8a8"])
def test_compiled_greedy_equals_eager_and_risd_equals_ar(tokenizer, kernels):
    model, cfg = gated_tiny(kernels)
    eager = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg)
    compiled = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
    if kernels != "plain":  # the model's kernels enter the graph as opaque calls
        assert all(isinstance(m.kernel, OpaqueKernel) for m in model.modules() if getattr(m, "kernel", None))
    prompts = random_prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ar = eager.generate(prompts, params, decoding="ar")
    for p, want, got in zip(prompts, ar, compiled.generate(prompts, params, decoding="ar")):
        assert_same_tokens(got.token_ids, want.token_ids, p, model, f"compiled ar ({kernels})")
    for stride in (2, 4):
        risd = compiled.generate(prompts, params, decoding="risd", stride=stride)
        for p, want, got in zip(prompts, ar, risd):
            assert_same_tokens(got.token_ids, want.token_ids, p, model, f"compiled risd {stride} ({kernels})")
        alone = compiled.generate(prompts[:1], params, decoding="risd", stride=stride)[0]
        assert alone.token_ids == risd[0].token_ids  # batched == one at a time


@pytest.mark.parametrize("kernels,warm", [("packed", "risd"), ("panel", "risd"), ("int4", "risd"),
                                          ("int8 panel", "risd"), ("packed", "auto")])
def test_steps_do_not_recompile_once_their_shape_class_is_seen(tokenizer, kernels, warm, monkeypatch):
    if warm == "auto":  # whatever auto takes in its short warm-up requests (here AR alone), R-ISD's classes compile
        monkeypatch.setattr(Adaptive, "choose", lambda self, state, stats, batch: self.candidates[0])
    model, cfg = gated_tiny(kernels)
    projs = [m for m in model.modules() if getattr(m, "kernel", None) is not None]
    if kernels == "int4":  # row limits differ by weight shape, as measured ones do: each limit is a row-count branch
        for i, m in enumerate(projs):
            m.kernel.row_limit = (2, 4, 8, 48)[i % 4]
    llm = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
    if kernels == "int4":  # the graph takes the largest limit; eager calls keep each kernel's own
        assert [m.kernel.inner.row_limit for m in projs] == [(2, 4, 8, 48)[i % 4] for i in range(len(projs))]
        assert {m.kernel.row_limit for m in projs} == {48}
    assert llm.engine.runner.forward.row_limit == {"int4": 48}.get(kernels)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.warm_up(warm, 4)  # what `idlm serve` runs before its first request (auto: the default decoding)
    seen = counters["stats"]["unique_graphs"]
    other = [list(range(1000 + n, 1000 + 2 * n)) for n in (7, 20, 52, 90)]  # new lengths, batch compositions, positions
    for stride in (2, 3, 4):
        llm.generate(other, params, decoding="risd", stride=stride)
        for prompt in other:  # alone: a prefill of a few rows, of two blocks, of more than the row limit
            llm.generate([prompt], params, decoding="risd", stride=stride)
    llm.generate(other, params, decoding="ar")
    llm.generate(other[2:], params, decoding="ar")
    assert counters["stats"]["unique_graphs"] == seen


def test_steps_of_one_group_run_their_attention_inside_the_graph(tokenizer, monkeypatch):
    """Decode steps (one sequence or several) trace the paged attention into their graph; only a step with a
    prefill chunk beside another sequence calls it at run time (`idlm::attend`)."""
    model, cfg = gated_tiny("packed")
    llm = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
    llm.warm_up("risd", 4)
    calls = []
    run = PagedAttention.attend
    monkeypatch.setattr(PagedAttention, "attend", lambda self, *a: calls.append(len(self.groups)) or run(self, *a))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    short = [list(range(1000, 1010)), list(range(1100, 1106))]
    for decoding in ("ar", "risd"):
        llm.generate(short, params, decoding=decoding)
    assert calls == []
    llm.generate([short[0][:4], list(range(1200, 1200 + 2 * SHORT_QUERY))], params, decoding="risd")
    assert calls and all(n > 1 for n in calls)


def test_two_compiled_engines_keep_their_own_weights(tokenizer):
    """Their graphs share one code object and the guards inside each model are filtered out: each engine must
    still run its own model (a graph traced on one model's int4 kernels holds their tensors)."""
    prompts = random_prompts()[:2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = []
    for seed in (0, 1):
        model, cfg = gated_tiny_model(seed)
        quantize_model(model, "int4", row_limit=4)
        eager = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg)
        compiled = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
        want = [o.token_ids for o in eager.generate(prompts, params, decoding="risd", stride=4)]
        outputs.append((compiled, want))
    for compiled, want in outputs:  # interleaved: the second engine's graphs exist when the first runs again
        assert [o.token_ids for o in compiled.generate(prompts, params, decoding="risd", stride=4)] == want
    assert outputs[0][1] != outputs[1][1]


def test_isd_after_ar_on_a_model_without_a_mask_embedding(tokenizer):
    """No adapter and no MASK embedding yet: the engine gives MASK its embedding before any graph compiles, so ISD
    after AR (serve's warm-up order) runs the graphs of the model it decodes with (it aborted the process on an
    out-of-vocabulary index when the embedding came with the first ISD request)."""
    model, _ = gated_tiny_model()
    model.mask_embedding = None
    prompts = random_prompts()[:2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    compiled = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], compile=True)
    assert model.mask_embedding is not None
    ar = compiled.generate(prompts, params, decoding="ar")
    isd = compiled.generate(prompts, params, decoding="isd", stride=4)
    eager = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id]).generate(prompts, params, decoding="isd", stride=4)
    for a, i, e in zip(ar, isd, eager):
        assert i.token_ids == e.token_ids and len(a.token_ids) == 12


def test_a_compiled_step_turns_no_model_float_into_a_tensor(tokenizer, monkeypatch):
    """RMSNorm eps and adapter scalings are constants of the graph: as graph inputs, each was made a tensor on every
    call (about 0.7 ms of an embedded-model AR step)."""
    model, cfg = gated_tiny("packed")
    llm = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
    llm.warm_up("risd", 4)
    made = []
    real = torch._as_tensor_fullprec
    monkeypatch.setattr(torch, "_as_tensor_fullprec", lambda v: made.append(v) or real(v))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for decoding in ("ar", "risd"):
        llm.generate(random_prompts()[:2], params, decoding=decoding, stride=4)
    assert made == []


@pytest.mark.parametrize("kernels", ["int4", "int8 panel", "w8a8"])
def test_the_models_tensors_are_attributes_of_its_graphs_not_inputs(tokenizer, monkeypatch, kernels):
    """Graph inputs are fetched by Python before every call: the model's tensors (parameters, the kernels' packed
    weights and scales) must be held by the graphs, and only the step's own tensors passed in."""
    model, cfg = gated_tiny(kernels)
    graph_inputs = []
    real = compile_fx.compile_fx
    monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, example_inputs, *a, **k:
                        graph_inputs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
                        or real(gm, example_inputs, *a, **k))
    llm = LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for decoding in ("ar", "risd"):
        llm.generate(random_prompts()[:2], params, decoding=decoding, stride=4)
    weights = list(model.parameters()) + [
        t for m in model.modules() if getattr(m, "kernel", None) is not None for t in tensors_of(m.kernel.inner)]
    assert len(graph_inputs) >= 2 and len(weights) > 40
    held = {t.untyped_storage().data_ptr() for t in weights if not t.is_mkldnn}  # oneDNN-packed: opaque calls
    for inputs in graph_inputs:  # the step's ids, positions, KV pool and its tables, the gated rows
        assert len(inputs) <= 12 and not held & {t.untyped_storage().data_ptr() for t in inputs}


def tensors_of(kernel) -> list[torch.Tensor]:
    """The tensors a kernel object holds, one level of our objects down (Int8Linear -> Int8Panels)."""
    found = []
    for value in vars(kernel).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value).__module__.startswith("idlm."):
            found += [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
    return found


def test_compiled_kernels_are_kept_in_idlms_cache_unless_the_user_chose_a_place(tokenizer, tmp_path, monkeypatch):
    """Importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to torch's default (under /tmp): a compiling engine moves
    it beside the converted models; a place the user set is kept."""
    default_cache_dir = pytest.importorskip("torch._inductor.runtime.cache_dir_utils").default_cache_dir
    model, cfg = gated_tiny_model()
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    for preset, want in ((default_cache_dir(), tmp_path / "cache" / "inductor"), (str(tmp_path / "mine"), None)):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", preset)
        LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, compile=True)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(want or preset)
