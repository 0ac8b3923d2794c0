"""`idlm distill`: the base model's responses through continuous batching, resumable, multi-turn in rounds."""
from __future__ import annotations

import json

from idlm.training import distill
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)


def test_distill_writes_each_response_as_it_finishes_and_resumes(tmp_path, tiny_tokenizer):  # noqa: F811
    """Continuous batching over every prompt: each record's response is the base model's greedy answer to its
    chat prompt (as `LLM.generate` gives it alone); a second run skips what is written."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    gen = distill.Generator(str(tmp_path / "model"), "cpu", None, batch_size=2, max_len=96)
    prompts = [{"prompt": p, "source": "t"} for p in ["The quick brown fox", "What is 2 + 2?", "Write a haiku",
                                                      "The sea", "brown fox"]]
    out = tmp_path / "d.jsonl"
    stats = distill.distill(gen, prompts, out, max_tokens=12, progress=False)
    assert stats["written"] == 5 and stats["already_done"] == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["messages"][0]["content"] for r in recs) == sorted(p["prompt"] for p in prompts)
    for r in recs:
        alone = gen.run([r["prompt_ids"]], 0.0, 12, seed=0)[0]
        assert r["response_ids"] == alone.token_ids and r["messages"][1]["content"] == alone.text
    again = distill.distill(gen, prompts + [{"prompt": "One more", "source": "t"}], out, max_tokens=12,
                            progress=False)
    assert again["already_done"] == 5 and again["written"] == 1
    blocks = gen.llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_multi_turn_prompts_are_answered_in_the_conversation_the_model_wrote(tmp_path, tiny_tokenizer):  # noqa: F811
    """Round k answers user turn k after the base model's own earlier answers (the record's prompt is that
    whole conversation); the manifest counts what the file holds; a rerun writes nothing."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    gen = distill.Generator(str(tmp_path / "model"), "cpu", None, batch_size=2, max_len=160)
    prompts = [{"prompt": "The sea", "source": "a", "turns": ["brown fox", "The quick"]},
               {"prompt": "Write a haiku", "source": "b"}]
    out = tmp_path / "d.jsonl"
    stats = distill.distill(gen, prompts, out, max_tokens=8, progress=False)
    recs = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert stats["by_turn"] == {1: 2, 2: 1, 3: 1} and len(recs) == 4
    one = recs[distill.turn_key(["The sea"])]
    two = recs[distill.turn_key(["The sea", "brown fox"])]
    three = recs[distill.turn_key(["The sea", "brown fox", "The quick"])]
    assert (one["turn"], two["turn"], three["turn"]) == (1, 2, 3)
    assert two["messages"][:2] == one["messages"] and three["messages"][:4] == two["messages"]
    assert two["prompt_ids"] == gen.chat_ids(one["messages"] + [{"role": "user", "content": "brown fox"}])
    assert two["response_ids"] == gen.run([two["prompt_ids"]], 0.0, 8, seed=0)[0].token_ids
    info = distill.manifest(out, seed=0)
    assert info["records"] == len(recs) == stats["written"] and info["seed"] == 0
    assert info["response_tokens"] == sum(len(r["response_ids"]) for r in recs.values())
    assert sum(info["by_turn"].values()) == len(recs) and info["by_source"]["b"]["records"] == 1
    assert distill.distill(gen, prompts, out, max_tokens=8, progress=False)["written"] == 0
