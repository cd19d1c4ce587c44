"""Route a Hugging Face model's `generate` through rlhf_kernels.generation.

    from rlhf_kernels.integrations.transformers import apply_rlhf_kernels
    apply_rlhf_kernels(model)          # model.generate(...) now runs the fused loop
    remove_rlhf_kernels(model)         # back to HF's own

The replacement reads HF's arguments (and the model's generation_config for what is not
given): greedy or sampling with temperature / top-k / top-p, max_new_tokens (or max_length),
eos / pad ids, and returns what HF returns for them: the sequences [B, P + N] padded with the
pad id after EOS. Calls it cannot serve exactly (beams, logits processors, return_dict, streamers,
penalties, ...) go to HF's `generate` unchanged.
"""
from __future__ import annotations

import logging

from ..generation import adapter_for, generate, unwrap

log = logging.getLogger("rlhf_kernels.integrations")
SERVED = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "do_sample",
          "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "generation_config",
          "use_cache", "min_new_tokens"}
NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
           "min_new_tokens": None, "min_length": 0, "no_repeat_ngram_size": 0,
           "return_dict_in_generate": False, "output_scores": False, "output_logits": False}


def _option(name, kwargs, config):
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)


def _fused_generate(model, original):
    def generate_with_rlhf_kernels(*args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
        config = kwargs.get("generation_config") or model.generation_config
        unserved = set(kwargs) - SERVED
        neutral = all(getattr(config, k, v) in (v, None) for k, v in NEUTRAL.items()
                      if k != "min_new_tokens") and kwargs.get("min_new_tokens") in (None, 0)
        ids = kwargs.get("input_ids", kwargs.get("inputs"))
        if unserved or not neutral or ids is None:
            return original(*args[1:], **kwargs) if args else original(**kwargs)
        prompt_len = ids.shape[1]
        new_tokens = _option("max_new_tokens", kwargs, config)
        if new_tokens is None:
            new_tokens = max((_option("max_length", kwargs, config) or 20) - prompt_len, 0)
        sample = bool(_option("do_sample", kwargs, config))
        out = generate(
            model, ids, kwargs.get("attention_mask"), max_new_tokens=new_tokens,
            temperature=(_option("temperature", kwargs, config) or 1.0) if sample else 0.0,
            top_k=(_option("top_k", kwargs, config) or 0) if sample else 0,
            top_p=(_option("top_p", kwargs, config) or 1.0) if sample else 1.0,
            eos_token_id=_option("eos_token_id", kwargs, config),
            pad_token_id=_option("pad_token_id", kwargs, config))
        return out.sequences
    return generate_with_rlhf_kernels


def apply_rlhf_kernels(model):
    """Patches `model.generate` (this instance only). Returns the model. A model family with
    no adapter is left alone, with one log line saying so."""
    if hasattr(model, "_rlhf_kernels_original_generate"):
        return model
    adapter, why = adapter_for(unwrap(model))
    if adapter is None:
        log.warning("apply_rlhf_kernels: %s; generate() left as it is", why)
        return model
    model._rlhf_kernels_original_generate = model.generate
    model.generate = _fused_generate(model, model.generate)
    log.info("apply_rlhf_kernels: %s.generate -> rlhf_kernels.generation (%s adapter)",
             type(model).__name__, adapter.family)
    return model


def remove_rlhf_kernels(model):
    original = model.__dict__.pop("_rlhf_kernels_original_generate", None)
    if original is not None:
        del model.generate
    return model
