"""The command line: one-line errors with exit status 2, and the --json contract."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import requires_embedded


def idlm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlm.cli", *args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_model_path(tmp_path):
    _one_error_line(idlm("generate", "hi", "--model", str(tmp_path / "nope")), "model not found")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _one_error_line(idlm("generate", "hi", "--model", str(tmp_path)), "unsupported architecture")


def test_corrupt_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    proc = idlm("generate", "hi", "--model", str(tmp_path))
    assert proc.returncode == 2 and "error: " in proc.stderr and "Traceback" not in proc.stderr


@requires_embedded
def test_invalid_sampling_parameter():
    _one_error_line(idlm("generate", "hi", "--temperature", "-1"), "temperature")


@requires_embedded
def test_json_output_is_one_object(embedded_llm):  # the fixture makes sure the model is converted
    proc = idlm("generate", "Name a color.", "--json", "--max-tokens", "8", "--decoding", "ar", "--adapter", "none")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    stats = out["stats"]
    assert set(stats) >= {"prompt_tokens", "generated_tokens", "forwards", "tokens_per_forward", "seconds",
                          "tokens_per_second"}
    assert stats["tokens_per_forward"] == 1.0 and stats["forwards"] == len(out["token_ids"])
    assert isinstance(out["text"], str) and out["text"]


@requires_embedded
def test_default_decoding_is_auto_with_its_choices_in_the_stats(embedded_llm, tmp_path):
    """The README's command: the shipped adapter, `auto` decoding (its cost model measured once, cached)."""
    log = tmp_path / "stats.jsonl"
    proc = idlm("generate", "Name a color.", "--chat", "--json", "--max-tokens", "24", "--stats-jsonl", str(log))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["decoding"] == "auto" and stats["stride"] == 4
    assert sum(stats["choices"].values()) == stats["forwards"] and set(stats) >= {"rounds", "acceptance_by_position"}
    assert json.loads(log.read_text())["choices"] == stats["choices"]
    ar = json.loads(idlm("generate", "Name a color.", "--chat", "--json", "--max-tokens", "24",
                         "--decoding", "ar").stdout)
    assert ar["token_ids"] == json.loads(proc.stdout)["token_ids"]
    _one_error_line(idlm("generate", "hi", "--decoding", "auto", "--fast-verify"), "auto chooses")


@requires_embedded
def test_risd_without_adapter_is_a_clear_error(embedded_llm):
    _one_error_line(idlm("generate", "hi", "--decoding", "risd", "--adapter", "none"), "risd needs a gated adapter")


@pytest.mark.parametrize("cmd", [["models"], ["--help"]])
def test_informational_commands(cmd):
    proc = idlm(*cmd)
    assert proc.returncode == 0, proc.stderr
