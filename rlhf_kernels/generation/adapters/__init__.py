"""Model adapters: which Hugging Face families run on the fused generation path."""
from __future__ import annotations

from torch import nn

from .base import DecoderAdapter, Unsupported
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS = (LlamaAdapter, GPT2Adapter, OPTAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def unwrap(model):
    """The model inside its training wrappers, however nested: the `.module` of a DeepSpeed
    engine, of DDP and of rlhf's TorchEngine, and the base model of a peft `PeftModel`
    (`get_base_model()`, with its LoRA layers still in it). A Hugging Face model (one whose
    config has a `model_type`) and any other module come back as they are."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) \
                and not hasattr(getattr(model, "config", None), "model_type"):
            model = inner                     # DeepSpeed engine (its config: a dict), DDP
            continue
        get_base_model = getattr(model, "get_base_model", None)
        base = get_base_model() if callable(get_base_model) else model
        if base is model:
            return model
        model = base


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
