"""Tokenizer and end-of-sequence ids of a local HF directory (never touches the network)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from idlm.loading.errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(hf_dir: Path, hf_config: dict[str, Any], family: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` for `hf_dir`, offline and without remote code.

    When config.json needs custom code (`auto_map`) or has a model_type transformers does not know (official
    I-DLM `sdar`), a stock config of our `family` stands in for it in the tokenizer class lookup.
    """
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer files ({' / '.join(TOKENIZER_FILES)}) in {hf_dir}")
    custom = "auto_map" in hf_config or hf_config.get("model_type") not in CONFIG_MAPPING_NAMES
    config = AutoConfig.for_model(family) if custom else None
    try:
        return AutoTokenizer.from_pretrained(hf_dir, config=config, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types; all mean "this directory's tokenizer is unusable"
        raise ModelLoadError(f"cannot load tokenizer ({e}): {hf_dir}") from e


def eos_token_ids(generation_config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Union of generation_config's `eos_token_id` (int or list) and the tokenizer's, in that order."""
    ids = generation_config.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))
