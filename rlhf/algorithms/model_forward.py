"""Forward passes of causal LMs and value models over prompt + response sequences.

Sequences are [B, P+N]: a LEFT padded prompt of P tokens, then N response tokens. The logits
at positions P-1 .. P+N-2 predict the response tokens, and the value at the same positions is
the value of the state before each response token (as DeepSpeed-Chat).
"""
from __future__ import annotations

import inspect

import torch

# position ids count real tokens only, as generation (ours and HF's) counts them, so that the
# padding (left of the prompt, right of the response) does not shift any real token's position;
# unwrap: the model inside a DeepSpeed engine / DDP / TorchEngine / peft model
from rlhf_kernels.generation import position_ids_from_mask, unwrap

from ..models.fused_forward import routed


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(unwrap(model).forward).parameters


def check_sequences(sequences, attention_mask, prompt_len: int) -> int:
    """Validate the shapes; returns N, the number of response positions."""
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences must be a [B, P+N] tensor, got "
                         f"{getattr(sequences, 'shape', type(sequences).__name__)}")
    if sequences.dtype.is_floating_point or sequences.dtype == torch.bool:
        raise TypeError(f"sequences must hold integer token ids, got {sequences.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != sequences.shape:
        raise ValueError(f"attention_mask must have the shape of sequences "
                         f"{tuple(sequences.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    length = sequences.shape[1]
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) \
            or not 1 <= prompt_len < length:
        raise ValueError(f"prompt_len must be an int in [1, {length - 1}] for sequences of "
                         f"length {length} (at least one prompt and one response position), "
                         f"got {prompt_len!r}")
    return length - prompt_len


def causal_lm_logits(model, input_ids, attention_mask, keep_last: int = 0) -> torch.Tensor:
    """model(...).logits with position ids from the mask and no KV cache; with keep_last > 0
    and a model that supports it, only the last `keep_last` positions go through the LM head.
    Supported models run on the fused path (rlhf.models.fused_forward), with or without grad;
    a DeepSpeed engine is still called as an engine."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if keep_last and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep_last
    with routed(model):
        return model(**kwargs).logits


def response_logits(model, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """The logits [B, N, V] that predict the N response tokens: a view, not a copy."""
    n = check_sequences(sequences, attention_mask, prompt_len)
    logits = causal_lm_logits(model, sequences, attention_mask, keep_last=n + 1)
    # counted from the end: right whether the model kept n + 1 positions or all of them
    return logits[:, -(n + 1):-1]


def response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """critic(input_ids, attention_mask) -> [B, P+N] values; returns the [B, N] values of the
    states before each response token (positions P-1 .. P+N-2), float32. Differentiable;
    wrap in torch.no_grad() for rollouts."""
    n = check_sequences(sequences, attention_mask, prompt_len)
    values = critic(sequences, attention_mask)
    if not isinstance(values, torch.Tensor) or values.shape != sequences.shape:
        raise ValueError(f"the critic must return values of shape {tuple(sequences.shape)} "
                         f"(one per position), got "
                         f"{getattr(values, 'shape', type(values).__name__)}")
    return values[:, -(n + 1):-1].float()
