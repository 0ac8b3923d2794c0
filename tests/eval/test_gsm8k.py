"""GSM8K: answer extraction on hand-written cases; the fixture file loads with normalised gold numbers."""
from __future__ import annotations

from pathlib import Path

import pytest

from idlm.eval import gsm8k
from idlm.eval.tasks import EvalError, Item

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("text, expected", [
    ("#### 18", "18"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is 1,234.50 dollars.", "1234.5"),  # commas and units
    ("The answer is $1,000,000.", "1000000"),
    ("It fell to -5 degrees.", "-5"),  # negative
    ("She lost -$7 on it", "-7"),
    ("16 - 3 - 4 = 9", "9"),  # a subtraction is not a negative number
    ("16-3=13", "13"),
    ("#### -3.0", "-3"),  # decimals normalised
    ("0.50 of it", "0.5"),
    ("First 12, then 7, so 19 in all.", "19"),  # the last number wins
    ("#### 42\nCheck: 40 + 2 = 42, and 7 more is 49", "42"),  # the #### form wins over later numbers
    ("It is 12.", "12"),  # a full stop is not a decimal point
    ("no number here", None),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_fixture_loads_and_scores():
    items = gsm8k.load(DATA / "gsm8k.jsonl")
    assert [it.gold for it in items] == ["10", "2515", "-5"]
    assert items[0].messages[-1]["content"].endswith(gsm8k.INSTRUCTION)
    assert gsm8k.score(items[1], "So it costs 2,515 dollars.").correct
    assert not gsm8k.score(items[1], "#### 2500").correct
    assert gsm8k.score(items[2], "nothing").answer is None


def test_records_without_a_gold_answer_are_a_clear_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(EvalError, match="#### <number>"):
        gsm8k.load(f)
    item = Item("x", [], "5")
    assert gsm8k.score(item, "5").correct
