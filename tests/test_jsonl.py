"""idlm.jsonl: records with their line numbers, gzip read alike, bad lines named (or skipped on request)."""
from __future__ import annotations

import gzip

import pytest

from idlm.jsonl import read_jsonl


class Boom(ValueError):
    pass


def test_reads_plain_and_gzipped_alike_skipping_blank_lines(tmp_path):
    text = '{"a": 1}\n\n{"a": 2}\n'
    (tmp_path / "x.jsonl").write_text(text)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write(text)
    want = [(1, {"a": 1}), (3, {"a": 2})]
    assert list(read_jsonl(tmp_path / "x.jsonl")) == want == list(read_jsonl(tmp_path / "x.jsonl.gz"))


def test_errors_name_the_file_and_line_in_the_callers_type(tmp_path):
    with pytest.raises(Boom, match="file not found"):
        list(read_jsonl(tmp_path / "missing.jsonl", Boom))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n[1, 2]\n')
    with pytest.raises(Boom, match=r"bad.jsonl:2: not valid JSON"):
        list(read_jsonl(tmp_path / "bad.jsonl", Boom))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(Boom, match=r"list.jsonl:1: expected a JSON object"):
        list(read_jsonl(tmp_path / "list.jsonl", Boom))
    assert list(read_jsonl(tmp_path / "bad.jsonl", skip_invalid=True)) == [(1, {"a": 1})]
