"""The trainer's forwards of whole sequences on rlhf_kernels' fused path: the experience step's
no-grad forwards (reference log-probs, reward scores, critic values) and the actor's and
critic's training forwards. Hugging Face runs whatever that path does not serve (see
rlhf_kernels.generation.sequence): the same calls, the same results to float32 rounding.
"""
from __future__ import annotations

import contextlib

from transformers.modeling_outputs import CausalLMOutputWithPast

from rlhf_kernels.generation import sequence_forward, unwrap

ENABLED = True  # False: every forward through Hugging Face (the benchmarks' baseline path)


def fused_hidden(backbone, input_ids, attention_mask, position_ids=None):
    """The base model's last_hidden_state, or None: disabled, no mask, or a model the fused
    path cannot serve."""
    if not ENABLED or attention_mask is None:
        return None
    return sequence_forward(backbone, input_ids, attention_mask, position_ids=position_ids,
                            hidden=True)


def _causal_lm_forward(model, input_ids=None, attention_mask=None, position_ids=None,
                       use_cache=None, logits_to_keep=0, **rest):
    """A causal LM's forward: the fused path for the trainer's calls (ids, mask, positions,
    no cache), HF's own forward for anything else."""
    if ENABLED and not rest and not use_cache and input_ids is not None \
            and attention_mask is not None and isinstance(logits_to_keep, int):
        logits = sequence_forward(model, input_ids, attention_mask, position_ids=position_ids,
                                  last=logits_to_keep)
        if logits is not None:
            return CausalLMOutputWithPast(logits=logits)
    return type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **rest)


@contextlib.contextmanager
def routed(model):
    """Inside the block, calls of `model` (a causal LM, or a DeepSpeed engine / peft model
    around one) reach the fused forward. It replaces the forward of that one instance for the
    block only, so DeepSpeed's engine forward and its backward hooks run as usual, and copies,
    checkpoints and other users of the model never see it. Left alone: anything but a Hugging
    Face model inside, and a model whose instance has its own forward (accelerate hooks)."""
    inner = unwrap(model)
    if not ENABLED or not hasattr(getattr(inner, "config", None), "model_type") \
            or "forward" in vars(inner):
        yield
        return
    inner.forward = _causal_lm_forward.__get__(inner)
    try:
        yield
    finally:
        del inner.forward
