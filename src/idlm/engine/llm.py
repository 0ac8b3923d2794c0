"""The Python API users know from vLLM: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`.

`LLM` is the one offline driver of the engine: batches, streaming chat, distillation and the acceptance
evaluation all submit requests here and step the same engine (continuous batching, preemption, prefix cache).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence as Seq

import torch

from idlm.decoding.adaptive import Adaptive
from idlm.decoding.decoder import TokenLogprob
from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stats import RequestStats
from idlm.engine.cost_model import CONTEXT, CostModel, measure
from idlm.engine.machine_cache import load_record, machine_key, save_record
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.engine.sequence import Sequence
from idlm.loading import load_checkpoint
from idlm.loading.cache import cache_dir
from idlm.models.fuse import fuse_projections
from idlm.models import attention, block_codes, kernel_choice, panel
from idlm.models.llama import CausalLM, Proj
from idlm.models.lora import AdapterConfig, load_adapter, pack_adapter
from idlm.models.panel import PanelLinear, PanelLoRA
from idlm.models.quantize import FORMATS as QUANTIZE_FORMATS, Int4Linear, bf16_weights, quantize_model
from idlm.weight_formats import WEIGHT_FORMATS

DECODINGS = ("auto", "ar", "isd", "risd")
# Acceptance by draft position assumed for an adapter that records none (adaptive decoding's prior).
DEFAULT_ACCEPTANCE = [0.35]


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: RequestStats = field(default_factory=RequestStats)
    kinds: list[str] = field(default_factory=list)  # how each token was committed: draft, clean, correction
    logprobs: list[TokenLogprob] | None = None  # per token, when SamplingParams.logprobs is set


def _output(prompt: str | None, seq: Sequence) -> RequestOutput:
    return RequestOutput(prompt, seq.prompt_ids, seq.text, seq.output_ids, seq.finish_reason, seq.stats,
                         list(seq.kinds), list(seq.logprobs) if seq.params.logprobs is not None else None)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bf16 greedy text drifts from fp32 within a few dozen tokens), bfloat16 on GPU."""
    return torch.float32 if str(device).startswith("cpu") else torch.bfloat16


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float32 or bfloat16")
    return table[dtype]


def _compiled_kernels_beside_models() -> None:
    """Compiled kernels persist in $IDLM_CACHE/inductor, beside the converted models, not under /tmp. Importing
    torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to torch's default, so that value is replaced; one a user chose is
    kept (the compiler reads the variable whenever it opens its caches)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # a torch that keeps it elsewhere; it then sets the variable only when first used
        torch_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class LLM:
    """Load a model once, then generate for batches of prompts."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        adapter: str | None = None,
        pack_cpu_weights: bool = True,
        fuse: bool = True,
        quantize: str | None = None,
        panel: str = "auto",
        **engine: Any,
    ):
        """adapter: a PEFT/idlm adapter dir; None = the model's default adapter if it ships one; "none" = no adapter.
        pack_cpu_weights: on CPU, pre-pack frozen weights for oneDNN (few-row forwards cost near one row).
        fuse: q/k/v and gate/up (and their adapters) as one matmul each (models/fuse.py).
        quantize: None, "int8" (CPU: int8 weights per output channel, products with bfloat16 inputs, everything
            else in `dtype`), "int4" (CPU: int4 weights per group of 32, GGUF Q4_1's layout, the LM head int8;
            products with bfloat16 inputs), "w8a8" (CPU: int8 weights per output channel against activations
            quantized per block of 32 inputs, integer sums, by the panel kernels) or "bf16" (CPU with AVX512-BF16:
            weights rounded to bfloat16, products with bfloat16 inputs, everything else in `dtype`);
            models/quantize.py.
        panel: our AVX2 / AVX-512 panel kernels (models/panel.py, built on first use) for the products of float32
            weights (instead of oneDNN's) and of int8 ones (instead of aten's): "on", "off", or "auto": where they are
            the faster on this machine, measured once (kept in $IDLM_CACHE/panel/); off where they cannot be built.
        engine: `EngineConfig` fields (kv_cache_tokens, max_num_seqs, max_num_batched_tokens, max_model_len,
        kv_block_size, enable_prefix_caching, clamp_max_tokens, stationary, compile)."""
        device = device or default_device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch sees no CUDA device")
        if quantize not in (None, *WEIGHT_FORMATS):
            raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if panel not in ("auto", "on", "off"):
            raise ValueError(f"unknown panel {panel!r}; choose auto, on or off")
        self.quantize = None if quantize in (None, "none") else quantize
        if self.quantize and not device.startswith("cpu"):
            raise ValueError(f"quantize {quantize} is a CPU path (CPU kernels with bfloat16 inputs)")
        self.device = device
        self.dtype = parse_dtype(dtype, device)
        self.checkpoint = load_checkpoint(model, self.dtype, device)
        self.tokenizer = self.checkpoint.tokenizer
        self.adapter: AdapterConfig | None = None
        self.adapter_path = self.checkpoint.default_adapter if adapter is None else (None if adapter == "none" else adapter)
        if self.adapter_path is not None:
            try:
                self.adapter = load_adapter(self.checkpoint.model, self.adapter_path)
            except (OSError, KeyError, ValueError) as e:
                raise ValueError(f"cannot load adapter {self.adapter_path}: {e}") from e
        self.fused = fuse
        if fuse:
            fuse_projections(self.checkpoint.model)
        cpu = device.startswith("cpu") and pack_cpu_weights
        self.panel = cpu and self._panel(panel)
        self.row_limits = self._quantize() if self.quantize in QUANTIZE_FORMATS else None
        if self.quantize == "bf16":
            bf16_weights(self.checkpoint.model)
        if cpu:
            kind = PanelLinear if self.panel and self.dtype == torch.float32 else None
            self.checkpoint.model.pack_for_cpu_inference(kind)
            if kind is not None and self.adapter is not None:  # the adapter keeps the model's float32 (int8 too)
                pack_adapter(self.checkpoint.model, PanelLoRA)
        self.name = self.checkpoint.name
        self._start(self.checkpoint.model, self.checkpoint.eos_token_ids, self.checkpoint.config.draft_len, engine)

    def _quantize(self) -> dict[str, int]:
        """Quantized weights with the kernels' row limits measured on this machine once and kept in
        $IDLM_CACHE/row_limits/ (measurements vary up to 2x between start-ups: runs on one machine should
        choose the same kernels)."""
        root = cache_dir()
        key = {**machine_key(), "dtype": str(self.dtype), "measures": "row_limit", "panel": self._panel_id}
        known = load_record(root, "row_limits", key) or {}
        limits = quantize_model(self.checkpoint.model, self.quantize, known=known, panel=self.panel)
        if not limits.items() <= known.items():
            save_record(root, "row_limits", key, {**known, **limits})
        return limits

    @property
    def _panel_id(self) -> str | bool:
        """Which panel kernels measurements were made with (False: none): a changed kernel measures again."""
        return panel.kernels_id() if self.panel else False

    def _panel(self, choice: str) -> bool:
        """Whether the panel kernels serve this model's products: `choice`, or for "auto" whether they are the
        faster on this machine over the model's own weight shapes (float32, or int8 where the format has int8
        products), measured once and kept in $IDLM_CACHE/panel/."""
        model = self.checkpoint.model
        if self.quantize == "w8a8":  # its products are a panel kernel: there is no other choice to measure
            if choice == "off":
                raise ValueError("w8a8 runs on the panel kernels: it cannot take panel off")
            why_not = panel.available(cache_dir() / "kernels")
            if why_not:
                raise ValueError(f"w8a8 needs the panel kernels: {why_not}")
            return True
        fmt = "int8" if self.quantize in QUANTIZE_FORMATS else \
            "fp32" if self.quantize is None and self.dtype == torch.float32 else None
        if fmt == "fp32" and block_codes.codes(next(m.weight for m in model.modules() if isinstance(m, Proj))):
            fmt = "gguf"  # GGUF blocks made float32 (the embedded model): the panel kernels read their codes
        if choice == "off" or fmt is None:
            if choice == "on":
                raise ValueError(f"the panel kernels take float32 or int8 weights, not {self.quantize or self.dtype}")
            return False
        why_not = panel.available(cache_dir() / "kernels")
        if why_not:
            if choice == "on":
                raise ValueError(why_not)
            return False
        if choice == "on":
            return True
        shapes = {tuple(model.output_weight().shape)} | {  # int4 keeps its own kernel where the shape fits it
            tuple(m.weight.shape) for m in model.modules() if isinstance(m, Proj)
            and not (self.quantize == "int4" and Int4Linear.fits(m.weight))}
        root = cache_dir()
        key = {**machine_key(), "measures": f"panel {fmt}", "shapes": [list(s) for s in sorted(shapes)],
               "kernels": panel.kernels_id()}
        record = load_record(root, "panel", key)
        if record is None:
            record = kernel_choice.panel_is_faster(sorted(shapes), fmt)
            save_record(root, "panel", key, record)
        return bool(record["panel"])

    @classmethod
    def from_model(cls, model: CausalLM, tokenizer: Any, eos_token_ids: list[int],
                   adapter: AdapterConfig | None = None, name: str = "in-memory", **engine: Any) -> "LLM":
        """Drive an in-memory model (e.g. during training); `adapter` describes the LoRA already attached to it."""
        self = cls.__new__(cls)
        p = next(model.parameters())
        self.device, self.dtype = str(p.device), p.dtype
        self.checkpoint = None
        self.tokenizer = tokenizer
        self.adapter, self.adapter_path, self.name = adapter, None, name
        self.fused, self.quantize, self.row_limits, self.panel = False, None, None, False
        self._start(model, eos_token_ids, model.config.draft_len, engine)
        return self

    def _start(self, model: CausalLM, eos_token_ids: list[int], draft_len: int | None, engine: dict) -> None:
        try:
            config = EngineConfig(**engine)
        except TypeError as e:
            raise ValueError(f"unknown engine option: {e}") from e
        if config.compile:
            _compiled_kernels_beside_models()
        # a MASK outside the vocabulary that no adapter brought gets the untrained mean embedding now: the model is
        # frozen once the engine runs (compiled step graphs do not check it again; created later, by the first ISD
        # request, an AR graph fed the MASK id to the vocabulary table and aborted the process)
        model.init_mask_embedding()
        self.model = model
        self.model_draft_len = draft_len
        self.engine = LLMEngine(model, self.tokenizer, eos_token_ids, config)
        self._adaptive: dict[int, Adaptive] = {}

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Raw text to ids (no chat template; special tokens as the tokenizer adds them)."""
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    # ---- costs --------------------------------------------------------------------------------
    def cost_model(self, decodings: list[Decoding] | None = None, batches: tuple[int, ...] = (1, 4, 16),
                   repeats: int = 5) -> CostModel:
        """Forward times of AR and the given decodings' layouts on this machine: read from the cache
        ($IDLM_CACHE/cost/) or measured now (the engine must be idle) and cached (an in-memory model's are
        measured every time)."""
        decodings = decodings or [self.make_decoding("risd" if self.adapter is not None else "isd")]
        blocks = self.engine.blocks
        fit = blocks.num_free_blocks // blocks.blocks_for(CONTEXT + max(d.max_step_rows for d in decodings) + 2)
        batches = tuple(b for b in batches if b <= min(fit, self.engine.config.max_num_seqs)) or (1,)
        key = {**machine_key(), "model": self.name, "dtype": str(self.dtype), "device": str(self.device),
               "adapter": str(self.adapter_path), "fused": self.fused, "quantize": self.quantize,
               "panel": self._panel_id, "attention": attention.METHODS, "compile": self.engine.config.compile,
               "batches": list(batches),
               "layouts": sorted({repr(d) for d in decodings}), "measures": "forward + greedy decode, interleaved"}
        if self.checkpoint is None:
            return measure(self.engine, decodings, list(batches), repeats=repeats, key=key)
        root = cache_dir()
        found = CostModel.load(root, key)
        if found is not None:
            return found
        print(f"idlm: measuring step costs on this machine for adaptive decoding (once, about 30 s on 2 CPU "
              f"cores; cached in {root / 'cost'})", file=sys.stderr, flush=True)
        model = measure(self.engine, decodings, list(batches), repeats=repeats, key=key)
        model.save(root)
        return model

    # ---- decoding -----------------------------------------------------------------------------
    @property
    def default_decoding(self) -> str:
        """`auto` (per step, AR or the fastest lossless ISD layout) when an adapter is loaded, else AR."""
        return "auto" if self.adapter is not None else "ar"

    @property
    def default_stride(self) -> int:
        """From the adapter (trained stride, or its draft length + 1), an official checkpoint's, else 4."""
        a = self.adapter
        if a is not None and a.trained_stride:
            return int(a.trained_stride)
        if a is not None and a.draft_len:
            return int(a.draft_len) + 1
        if self.model_draft_len:
            return int(self.model_draft_len) + 1
        return 4

    def make_decoding(self, decoding: str | None = None, stride: int | None = None,
                      **options: Any) -> Decoding | Adaptive:
        """ar | isd (the model, or base + adapter on every row) | risd (base + gated adapter on MASK rows) |
        auto (AR or ISD/R-ISD at strides 2..N with or without branches, re-chosen before every step)."""
        decoding = decoding or self.default_decoding
        if decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; choose one of {', '.join(DECODINGS)}")
        if decoding == "auto":
            if options:
                raise ValueError(f"auto chooses among lossless layouts itself; options {sorted(options)} apply to "
                                 "isd/risd only")
            return self.adaptive(stride)
        gated_adapter = self.adapter is not None and self.adapter.gated
        if decoding == "ar":
            if options:
                raise ValueError(f"options {sorted(options)} apply to isd/risd only")
            return Decoding("ar", 1, "all" if self.adapter is not None and not gated_adapter else "none")
        if decoding == "risd" and self.adapter is None:
            raise ValueError(
                f"risd needs a gated adapter: pass adapter=PATH (model {self.name!r} ships no default adapter)"
            )
        if self.adapter is None:
            lora = "none"
        else:
            lora = "gated" if (decoding == "risd" or gated_adapter) else "all"
        name = "risd" if lora == "gated" else "isd"  # a gated adapter always acts on MASK rows only
        return Decoding(name, stride or self.default_stride, lora, **options)

    def adaptive(self, stride: int | None = None) -> Adaptive:
        """The `auto` decoding up to stride N: its candidates' forward costs come from the cost model (measured
        once per machine and setup, then cached), its prior from the adapter's recorded acceptance."""
        n = stride or self.default_stride
        found = self._adaptive.get(n)
        if found is None:
            base = self.make_decoding("risd" if self.adapter is not None and self.adapter.gated else "isd", n)
            isd = [Decoding(base.name, k, base.lora, branches=b)
                   for k in range(2, n + 1) for b in sorted({0, 1, k - 1})]
            candidates = [self.make_decoding("ar")] + isd
            prior = (self.adapter.acceptance if self.adapter is not None else None) or DEFAULT_ACCEPTANCE
            found = Adaptive(candidates, self.cost_model(isd), prior, self.model.mask_token_id)
            self._adaptive[n] = found
        return found

    def _decodings(self, n: int, decoding: Any, stride: Any, options: dict[str, Any]) -> list[Decoding | Adaptive]:
        """One decoding per request: `decoding` / `stride` may be lists (mixed layouts share each forward)."""
        if isinstance(decoding, (Decoding, Adaptive)):
            return [decoding] * n
        ds = decoding if isinstance(decoding, (list, tuple)) else [decoding] * n
        ns = stride if isinstance(stride, (list, tuple)) else [stride] * n
        if len(ds) != n or len(ns) != n:
            raise ValueError(f"decoding / stride lists must have one entry per prompt ({n})")
        made: dict[tuple, Decoding] = {}
        return [made.setdefault((d, k), d if isinstance(d, Decoding) else self.make_decoding(d, k, **options))
                for d, k in zip(ds, ns)]

    def _as_completed(self, prompts: list[tuple[str | None, list[int]]], params: Any,
                      decodings: list[Decoding]) -> Iterator[tuple[int, RequestOutput]]:
        """Submit every prompt, then yield (index, output) as each finishes; closing early aborts the rest."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        seqs: list[Sequence] = []
        try:
            for (_, ids), p, d in zip(prompts, plist, decodings):
                seqs.append(self.engine.add_request(ids, p, d))
            index = {s.seq_id: i for i, s in enumerate(seqs)}
            left = len(seqs)
            while left:
                for s in self.engine.step():
                    if s.seq_id in index:
                        left -= 1
                        i = index[s.seq_id]
                        yield i, _output(prompts[i][0], s)
        finally:
            for s in seqs:
                if not s.finished:
                    self.engine.abort(s)

    def _run(self, prompts: list[tuple[str | None, list[int]]], params: Any, decodings: list[Decoding],
             progress: Any = None) -> list[RequestOutput]:
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for i, out in self._as_completed(prompts, params, decodings):
            outputs[i] = out
            if progress is not None:
                progress(1)
        return outputs  # type: ignore[return-value]

    def as_completed(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None
                     = None, *, decoding: Any = None, stride: Any = None,
                     **options: Any) -> Iterator[tuple[int, RequestOutput]]:
        """Like `generate` (raw text or token ids), but yields (index, output) as each request finishes, so a
        long batch can be consumed, written and resumed incrementally; the engine keeps `max_num_seqs` running
        throughout (continuous batching). Closing the iterator early aborts the requests still running."""
        items = [(p, self.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompts]
        return self._as_completed(items, params, self._decodings(len(items), decoding, stride, options))

    def warm_up(self, decoding: str | None = None, stride: int | None = None) -> None:
        """Short greedy requests by AR and by `decoding` (default: the default one), so that compiled step graphs
        exist for every class of step before the first real request, and auto's cost model is measured. A class is:
        one row or a few, of one sequence or several, each gate kind, and where a step's rows lie against the sizes
        the graphs specialize (a size of 1: one KV block) or branch on (the quantized kernels' row limit). Hence:
        a short prompt alone (one block); prompts alone of just over one block and just past the limit; the short one
        beside another short one, then beside a prompt longer than the limit; and as many short ones together as
        make every decode step pass the limit (up to `max_num_seqs`). For `auto`, R-ISD at `stride` as well: auto's
        8-token requests may stay on AR, and its first R-ISD step would then compile inside a real request (measured:
        one graph inside a benchmark's first timed repeat, 41.6 against 104.8 tok/s). Needs an idle engine."""
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        short = self.encode("Warm-up: count from one to ten.")
        limit = getattr(self.engine.runner.forward, "row_limit", None)  # compiled: CompiledForward's
        past = [limit + 1] if limit else []  # rows that pass the graphs' row limit
        rows = max(64, limit or 0) + 1
        config = self.engine.config

        def prompt(text: str, n: int) -> list[int]:
            return (self.encode(text) * n)[:n]

        decodings = ["ar", decoding or self.default_decoding]
        if decodings[-1] == "auto":  # auto's short requests need not take an R-ISD step: R-ISD's classes by R-ISD
            decodings.append("risd")
        for d in dict.fromkeys(decodings):
            # prompts of their own per decoding: the prefix cache would otherwise shorten their prefill
            other = self.encode(f"Warm-up {d}: name three colours.")
            long = prompt(f"Warm-up {d}: one two three four five six seven eight nine ten.", rows)
            alone = [[prompt(f"Warm-up {d} alone {n}: eleven twelve thirteen.", n)]
                     for n in sorted({config.kv_block_size + 1, *past})]
            crowd = [[short] * min(config.max_num_seqs, n) for n in past if config.max_num_seqs > 1]
            for prompts in ([short], *alone, [short, other], [short, long], *crowd):
                self.generate(prompts, params, decoding=d, stride=None if d == "ar" else stride)

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None, *, decoding: Any = None,
               stride: int | None = None, **options: Any) -> Iterator[tuple[str, RequestOutput | None]]:
        """Yield (text delta, None) as tokens commit, then ("", final output). Closing early aborts the request."""
        d = self._decodings(1, decoding, stride, options)[0]
        seq = self.engine.add_request(prompt_ids, params or SamplingParams(), d)
        try:
            while not seq.finished:
                self.engine.step()
                delta = seq.read_text_delta()
                if delta:
                    yield delta, None
            yield seq.read_text_delta(), _output(None, seq)
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None,
                    **kw: Any) -> Iterator[tuple[str, RequestOutput | None]]:
        return self.stream(self.apply_chat_template(messages), params, **kw)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        decoding: Any = None,
        stride: Any = None,
        progress: Any = None,
        **options: Any,
    ) -> list[RequestOutput]:
        """Raw-text (or token-id) prompts, no chat template. `progress(n)` is called as requests finish."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        items = [(p, self.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompts]
        return self._run(items, params, self._decodings(len(items), decoding, stride, options), progress)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        decoding: Any = None,
        stride: Any = None,
        progress: Any = None,
        **options: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, with the model's chat template."""
        convs: Seq[list[dict[str, str]]] = [messages] if messages and isinstance(messages[0], dict) else messages  # type: ignore
        items = [(None, self.apply_chat_template(list(c))) for c in convs]
        return self._run(items, params, self._decodings(len(items), decoding, stride, options), progress)
