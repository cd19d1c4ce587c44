"""Model adapters: which Hugging Face families run on the fused generation path."""
from __future__ import annotations

from .base import DecoderAdapter, Unsupported
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS = (LlamaAdapter, GPT2Adapter, OPTAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def unwrap(model):
    """The Hugging Face causal LM under peft / DeepSpeed wrappers."""
    for _ in range(4):
        hf_config = hasattr(getattr(model, "config", None), "model_type")
        if hasattr(model, "module") and not hf_config:
            model = model.module                      # DeepSpeed engine (its config: a dict), DDP
        elif type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def adapter_for(model):
    """(adapter, None) for a supported model, else (None, reason)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            try:
                return cls(model), None
            except (Unsupported, AttributeError) as err:
                return None, f"{model_type} model with an unsupported feature: {err}"
    return None, f"no adapter for model_type {model_type!r} (adapters: {SUPPORTED_MODEL_TYPES})"


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "DecoderAdapter", "Unsupported", "adapter_for",
           "unwrap"]
