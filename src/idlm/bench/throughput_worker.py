"""One engine version under test, driven over stdin/stdout by `idlm bench throughput`.

Run as a script with PYTHONPATH pointing at the `src` of the idlm version to measure (this file uses only
the public `LLM` / `SamplingParams` API, which that version must have). Reads one JSON command per line:
{"concurrency", "decoding", "conversations", "max_tokens"}; answers one JSON line with wall time, tokens,
forwards per request and the engine's own counters where it has them.
"""
from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    import torch

    from idlm import LLM, SamplingParams

    llms: dict[int, object] = {}
    print(json.dumps({"ready": True, "idlm": os.path.dirname(__import__("idlm").__file__),
                      "capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        c = cmd["concurrency"]
        if c not in llms:
            llms.clear()
            llms[c] = LLM(cmd.get("model", "smollm2-135m"), max_num_seqs=c, kv_cache_tokens=cmd["kv_cache_tokens"])
        llm = llms[c]
        params = SamplingParams(temperature=0, max_tokens=cmd["max_tokens"], ignore_eos=True)
        llm.chat(cmd["conversations"][:1], SamplingParams(temperature=0, max_tokens=4), decoding=cmd["decoding"])
        t0 = time.perf_counter()
        outs = llm.chat(cmd["conversations"], params, decoding=cmd["decoding"])
        seconds = time.perf_counter() - t0
        print(json.dumps({
            "seconds": seconds,
            "generated_tokens": sum(len(o.token_ids) for o in outs),
            "forwards": [o.stats.forwards for o in outs],
            "request_seconds": [o.stats.seconds for o in outs],
            "cached_tokens": sum(getattr(o.stats, "cached_tokens", 0) for o in outs),
            "preemptions": sum(getattr(o.stats, "preemptions", 0) for o in outs),
            "token_ids": [o.token_ids for o in outs],
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
