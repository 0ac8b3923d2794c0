"""The weight formats an LLM runs in (`LLM(quantize=...)`, `--quantize`): one list for the engine's check and every
command line. "none" keeps the checkpoint's dtype; the rest are described in models/quantize.py."""

WEIGHT_FORMATS = ("none", "int8", "int4", "w8a8", "bf16")
