"""Forwards of whole padded sequences on the generation path (no KV cache), with or without
grad: what an RL trainer runs outside generation. Without grad: the experience step's
reference log-probs, reward scores and critic values; with grad: the actor's and the critic's
training forwards.

The same adapters as generation read the weights in place and run the model's math with
our CPU kernels where they apply (RMSNorm forward and backward; the skinny projections without
grad), torch ops elsewhere and SDPA over the padding mask. On the CPU this skips much of the
Hugging Face forward's per-call work and most autograd nodes of its norms (GPU: not measured
yet); logits and gradients equal HF's to float32 rounding. Models the
path cannot serve exactly return None, and the caller runs HF: no adapter, LoRA not merged,
ZeRO-3-partitioned weights, dropout active in training mode, or gradient checkpointing with
grad on.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import DecoderAdapter, adapter_for, unwrap
from .adapters.attention import SequenceAttention
from .fallback import position_ids_from_mask


def _dropout_active(model) -> bool:
    if not model.training:
        return False
    config = model.config
    if any(float(getattr(config, name, 0.0) or 0.0) > 0
           for name in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop",
                        "resid_pdrop", "embd_pdrop", "activation_dropout")):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _partitioned(model) -> bool:
    """ZeRO-3 keeps a parameter's data elsewhere (ds_id set); reading it in place is wrong.
    It partitions every parameter of a model, so the first one tells."""
    first = next(model.parameters(), None)
    return first is None or hasattr(first, "ds_id")


def _checkpointing(model) -> bool:
    """HF recomputes activations in backward when this is on; our path would keep them. HF
    marks each checkpointed module with a plain `gradient_checkpointing = True` attribute
    (what its is_activation_checkpointing reads, through slower attribute lookups)."""
    return any(m.__dict__.get("gradient_checkpointing", False) for m in model.modules())


def sequence_forward(model, input_ids, attention_mask, *, position_ids=None, last: int = 0,
                     hidden: bool = False, backend: str = "auto"):
    """One forward of [B, T] sequences with a 0/1 attention mask (left and / or right
    padding), or None where the fused path does not apply.

    Args:
        model: a causal LM (logits), or with hidden=True a causal LM or its base model.
        position_ids: default: counted over real tokens (`position_ids_from_mask`), as the
            trainer and generation count them.
        last: > 0: logits of the last `last` positions only.
        hidden: return the base model's last_hidden_state [B, T, hidden] (for value heads)
            instead of logits.

    Returns:
        logits [B, T or last, V] or hidden states [B, T, hidden] in the model's dtype.
    """
    model = unwrap(model)
    grad = torch.is_grad_enabled()
    if not isinstance(model, nn.Module) or not hasattr(model, "config") \
            or _dropout_active(model) or _partitioned(model) or (grad and _checkpointing(model)):
        return None
    adapter, _ = adapter_for(model)
    if adapter is None or (type(adapter).final_norm is DecoderAdapter.final_norm if hidden
                           else getattr(adapter, "lm_head", "") is None):
        return None
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask) if position_ids is None else position_ids
    adapter.use_kernels(backend, grad=grad)
    out = adapter.blocks_out(input_ids, positions, SequenceAttention(mask, adapter.windows))
    return adapter.final_norm(out) if hidden else adapter.head(out[:, -last:] if last else out)
