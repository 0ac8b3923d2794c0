"""llama.cpp as a decode-benchmark row: what a CPU user already runs on the same GGUF file.

llama-cpp-python is optional (`pip install idlm[bench]`, which builds llama.cpp from source: 10-17 minutes on
a 2-core machine); without it the benchmark notes how to add the row and goes on. Greedy, batch 1, the prompt
through the model's chat template (the same token ids as idlm's rows), exactly `max_tokens` new tokens (EOS
ignored), wall time per request.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

INSTALL = "pip install 'idlm[bench]'  (llama-cpp-python; builds llama.cpp from source, 10-17 min on 2 cores)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_for(model: str) -> Path | None:
    """The GGUF file behind a model name or path, if it has one."""
    from idlm.loading.registry import KNOWN_MODELS, embedded_gguf

    if model in KNOWN_MODELS:
        return embedded_gguf(KNOWN_MODELS[model])
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


class LlamaCpp:
    """One loaded GGUF model; `run` times greedy generations of exactly `max_tokens` tokens."""

    def __init__(self, gguf: Path, threads: int, context: int = 2048):
        import llama_cpp
        from llama_cpp import Llama

        self.name = f"{gguf.stem.rsplit('.', 1)[-1]} (llama-cpp-python {llama_cpp.__version__})"
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def _generate(self, ids: list[int], max_tokens: int) -> list[int]:
        out: list[int] = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)  # EOS ignored: every request does the same work as the other rows
            if len(out) == max_tokens:
                break
        return out

    def run(self, prompt_ids: list[list[int]], max_tokens: int) -> dict[str, Any]:
        """The prompts (token ids, chat template applied: the GGUF's vocabulary is the model's) one at a time;
        totals as in bench decode."""
        tokens, t0, outs = 0, time.perf_counter(), []
        for ids in prompt_ids:
            outs.append(self._generate(ids, max_tokens))
            tokens += len(outs[-1])
        seconds = time.perf_counter() - t0
        return {"tok_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "tpf": 1.0,
                "rows_per_forward": 1.0, "ms_per_step": seconds * 1e3 / tokens, "cold_share": 0.0, "tree_hits": 0,
                "acceptance": [], "token_ids": outs}
