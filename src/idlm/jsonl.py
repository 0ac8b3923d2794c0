"""Reading JSONL files, gzipped (.gz) or not: (line number, object) per non-empty line."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator


def read_jsonl(path: str | Path, error: type[Exception] = ValueError,
               skip_invalid: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Raises `error` naming the file (missing) or the file and line (not a JSON object), unless `skip_invalid`
    (third-party files, or a file whose last line a killed writer left half written) skips such lines."""
    p = Path(path)
    if not p.is_file():
        raise error(f"file not found: {p}")
    with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else p.open(encoding="utf-8")) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise error(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                if skip_invalid:
                    continue
                raise error(f"{p}:{n}: expected a JSON object")
            yield n, rec
