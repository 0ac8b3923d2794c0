"""idlm: Introspective Diffusion Language Models — training, Introspective Strided Decoding, serving."""
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm import LLM, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
