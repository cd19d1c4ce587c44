"""Fused KV-cache generation for Hugging Face causal LMs (see loop.py)."""
from .adapters import SUPPORTED_MODEL_TYPES, adapter_for, unwrap
from .cache import StaticKVCache
from .fallback import position_ids_from_mask, response_logprobs
from .loop import GenerationOutput, generate, new_cache
from .sequence import sequence_forward

__all__ = ["generate", "GenerationOutput", "StaticKVCache", "new_cache", "adapter_for",
           "response_logprobs", "sequence_forward", "SUPPORTED_MODEL_TYPES",
           "position_ids_from_mask", "unwrap"]
