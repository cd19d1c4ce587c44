"""The experience step's no-grad forwards (reference log-probs, reward scores, critic values)
on rlhf_kernels' fused sequence path, the inference side of the hybrid engine; Hugging Face
runs whatever that path does not serve (see rlhf_kernels.generation.sequence)."""
from __future__ import annotations

import torch

from rlhf_kernels.generation import sequence_forward

ENABLED = True  # False: every forward through Hugging Face (the benchmarks' baseline path)


def fused_logits(model, input_ids, attention_mask, *, last: int = 0):
    """Logits of the last `last` positions (all with 0), or None: grad on, disabled, or a
    model the fused path cannot serve."""
    if not ENABLED or torch.is_grad_enabled() or attention_mask is None:
        return None
    return sequence_forward(model, input_ids, attention_mask, last=last)


def fused_hidden(backbone, input_ids, attention_mask, position_ids=None):
    """The base model's last_hidden_state, or None (as fused_logits)."""
    if not ENABLED or torch.is_grad_enabled() or attention_mask is None:
        return None
    return sequence_forward(backbone, input_ids, attention_mask, position_ids=position_ids,
                            hidden=True)
