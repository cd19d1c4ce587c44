"""Fused KV-cache generation for Hugging Face causal LMs (see loop.py)."""
from .adapters import SUPPORTED_MODEL_TYPES, adapter_for
from .cache import StaticKVCache
from .fallback import response_logprobs
from .loop import GenerationOutput, generate, new_cache
from .sequence import sequence_forward

__all__ = ["generate", "GenerationOutput", "StaticKVCache", "new_cache", "adapter_for",
           "response_logprobs", "sequence_forward", "SUPPORTED_MODEL_TYPES"]
