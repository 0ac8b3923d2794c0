"""llama.cpp as a decode-benchmark row: what a CPU user already runs on the same GGUF file.

llama-cpp-python is optional (`pip install idlm[bench]`, which builds llama.cpp from source: 10-17 minutes on
a 2-core machine); without it the benchmark notes how to add the row and goes on. Greedy, batch 1, the prompt
through the model's chat template (the same token ids as idlm's rows), exactly `max_tokens` new tokens (EOS
ignored), wall time per request.

The model runs in a child process (this module run as a script), one request at a time while the bench waits:
a llama.cpp built for another CPU, or ggml 0.3.36's AMX kernels on a VM with AMX (`tilezero` without a loaded tile
configuration), die with SIGILL inside `llama_decode`, and that must cost the row, not the whole benchmark run.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL = "pip install 'idlm[bench]'  (llama-cpp-python; builds llama.cpp from source, 10-17 min on 2 cores)"
REBUILD = ("pip install diskcache && pip install --force-reinstall --no-deps --no-cache-dir --no-binary "
           "llama-cpp-python 'llama-cpp-python==0.3.36'")  # --no-deps leaves numpy alone; diskcache is the one it lacks
WORKER = [sys.executable, __file__]  # as a script: the worker imports llama_cpp, not idlm or torch


class LlamaCppError(RuntimeError):
    """The llama.cpp worker died."""


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
    """One GGUF model loaded in a worker process; `run` times greedy generations of exactly `max_tokens` tokens."""

    def __init__(self, gguf: Path, threads: int, context: int = 2048, worker: list[str] | None = None):
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr: why it died (a missing module, say)
        self.proc = subprocess.Popen(worker or WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.name = self._ask({"gguf": str(gguf), "threads": threads, "context": context})["name"]

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.seek(0)
            last = [text for text in self.log.read().splitlines() if text.strip()][-1:]
            raise LlamaCppError(_death(self.proc.wait()) + "".join(f": {text.strip()}" for text in last))
        return json.loads(line)

    def run(self, prompt_ids: list[list[int]], max_tokens: int) -> dict[str, Any]:
        """The prompts (token ids, chat template applied: the GGUF's vocabulary is the model's) one at a time;
        totals as in bench decode. Raises LlamaCppError if the worker dies."""
        return self._ask({"prompts": prompt_ids, "max_tokens": max_tokens})

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def _death(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = (f" (an instruction this machine does not run: a build made on another CPU, or ggml's AMX kernels on "
                f"some VMs; rebuild it here with {REBUILD}, without AMX as docs/benchmarks.md shows)"
                ) if name == "SIGILL" else ""
        return f"the llama.cpp worker died with {name}{hint}"
    return f"the llama.cpp worker exited with code {code}"


def _generate(llm, ids: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)  # EOS ignored: every request does the same work as the other rows
        if len(out) == max_tokens:
            break
    return out


def _timed(llm, prompt_ids: list[list[int]], max_tokens: int) -> dict[str, Any]:
    tokens, t0, outs = 0, time.perf_counter(), []
    for ids in prompt_ids:
        outs.append(_generate(llm, ids, max_tokens))
        tokens += len(outs[-1])
    seconds = time.perf_counter() - t0
    return {"tok_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "tpf": 1.0,
            "rows_per_forward": 1.0, "ms_per_step": seconds * 1e3 / tokens, "cold_share": 0.0, "tree_hits": 0,
            "acceptance": [], "token_ids": outs}


def main() -> int:
    """The worker: a JSON line {"gguf", "threads", "context"} loads the model and answers {"name"}; then each
    {"prompts", "max_tokens"} answers one run's totals."""
    import llama_cpp

    setup = json.loads(sys.stdin.readline())
    llm = llama_cpp.Llama(model_path=setup["gguf"], n_ctx=setup["context"], n_threads=setup["threads"],
                          n_threads_batch=setup["threads"], n_batch=512, verbose=False)
    name = f"{Path(setup['gguf']).stem.rsplit('.', 1)[-1]} (llama-cpp-python {llama_cpp.__version__})"
    print(json.dumps({"name": name}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps(_timed(llm, cmd["prompts"], cmd["max_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
