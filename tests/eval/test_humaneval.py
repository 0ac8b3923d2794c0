"""HumanEval: code extraction, program assembly, and scoring in the sandbox (canonical passes, wrong fails)."""
from __future__ import annotations

from pathlib import Path

from idlm.eval import humaneval
from idlm.eval.tasks import read_records

DATA = Path(__file__).parent / "data"


def test_code_extraction():
    assert humaneval.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert humaneval.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert humaneval.extract_code("```python\ndef f():\n    return") == "def f():\n    return"  # cut off
    assert humaneval.extract_code("    return 1\n") == "    return 1\n"  # no fence: the output itself


def test_canonical_solutions_pass_and_wrong_ones_fail():
    items = humaneval.load(DATA / "humaneval.jsonl")
    canon = {r["task_id"]: r["canonical_solution"] for r in read_records(DATA / "humaneval.jsonl")}
    for it in items:
        assert humaneval.score(it, canon[it.id]).correct  # a body continuing the prompt's stub
        full = it.data["prompt"] + canon[it.id]
        assert humaneval.score(it, f"Sure!\n```python\n{full}```\nThis works.").correct  # a full function
    add = items[0]
    wrong = humaneval.score(add, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not wrong.correct and wrong.detail.startswith("failed: AssertionError")
    loop = humaneval.score(add, "```python\ndef add(a, b):\n    while True:\n        pass\n```")
    assert not loop.correct and loop.detail.startswith("timeout")
    assert not humaneval.score(add, "I cannot do that.").correct  # not code: a syntax error
