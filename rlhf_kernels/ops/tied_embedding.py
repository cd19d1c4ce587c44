"""The input embedding of a model whose LM head shares its weight, with the embedding's
gradient added into the LM head's instead of beside it.

    embedding(ids, weight, padding_idx) -> weight[ids]     (F.embedding's values)

Why: with tied weights the weight's gradient is the sum of two [V, H] contributions. torch's
embedding backward builds its own dense [V, H] gradient (zeros, then the rows of the used ids)
and autograd adds it to the LM head's, which it holds until then: at the very end of backward,
when every layer's weight gradient already exists, two [V, H] tensors are alive at once
(SmolLM2-135M: 113 MB each; it is the peak of a TRL GRPO step).

How: our fused LM heads (rlhf_kernels.fused_linear_logprobs, which trl.patch() serves TRL's
with, and fused_linear_ppo_actor_loss) look up, when they record a graph, the latest embedding
forward on the same weight tensor. In backward, when that embedding's node will run later in
the same backward pass (autograd's own answer, torch._C._will_engine_execute_node, as
torch.autograd.graph's multi-grad hooks use it) and has not run yet, the head hands its dense
weight gradient to the embedding instead of to autograd; the embedding's backward adds its
rows into it (index_add_, in place) and returns the sum, the weight's one gradient. In every
other case (no fused head, an untied or frozen weight, a head whose hidden states do not come
from this embedding, a torch without those calls) each returns its own gradient as torch
does. The sum is the same up to float32 summation order.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# weight tensor -> the Link of its latest embedding forward that recorded a graph
_latest_forward = WeakIdKeyDictionary()


def _graph_task() -> Optional[int]:
    """The running backward pass's id (None outside one, or on a torch without the call)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    task = current() if current is not None else -1
    return None if task == -1 else task


class Link:
    """One embedding forward, as its fused LM heads see it: per backward pass, the dense
    gradients handed over and whether the embedding's backward has run."""

    def __init__(self, node):
        self.node = weakref.ref(node)  # the embedding's autograd node (its ctx)
        self.handed = {}               # graph task -> [dense gradients]
        self.done = set()              # graph tasks in which the embedding's backward ran

    def take(self, grad_weight: torch.Tensor) -> bool:
        """Whether the embedding takes `grad_weight` (the head then returns None for it)."""
        task, node = _graph_task(), self.node()
        will_run = getattr(torch._C, "_will_engine_execute_node", None)
        if task is None or node is None or will_run is None or task in self.done \
                or not will_run(node):
            return False
        self.handed.setdefault(task, []).append(grad_weight)
        return True


class TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ids, weight, padding_idx):
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, weight, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        ctx.link = Link(ctx)
        _latest_forward[weight] = ctx.link

    @staticmethod
    def backward(ctx, grad):
        task = _graph_task()
        ctx.link.done.add(task)
        handed = ctx.link.handed.pop(task, [])
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
        if not handed:
            return None, torch.ops.aten.embedding_dense_backward(
                grad, ids, ctx.shape[0], padding_idx, False), None
        total = handed[0]
        for other in handed[1:]:
            total.add_(other)
        ids, rows = ids.reshape(-1), grad.reshape(-1, ctx.shape[1])
        if ctx.padding_idx is not None:  # as the dense backward: no gradient for the pad row
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        return None, total.index_add_(0, ids, rows.to(total.dtype)), None


def embedding(ids: torch.Tensor, weight: torch.Tensor,
              padding_idx: Optional[int] = None) -> torch.Tensor:
    """F.embedding(ids, weight, padding_idx); its gradient takes a linked fused LM head's."""
    if not (torch.is_grad_enabled() and weight.requires_grad) \
            or torch.compiler.is_compiling():
        return F.embedding(ids, weight, padding_idx)
    return TiedEmbedding.apply(ids, weight, padding_idx)


def link(weight: torch.Tensor) -> Optional[Link]:
    """The latest embedding forward on `weight`, for a fused LM head's forward to keep."""
    return _latest_forward.get(weight)


def hand_over(link_: Optional[Link], grad_weight: torch.Tensor,
              weight_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """What a fused LM head's backward returns for the weight: None when the linked embedding
    takes `grad_weight` (same dtype as the weight, so nothing converts it later), else it."""
    if link_ is not None and grad_weight.dtype == weight_dtype \
            and grad_weight.is_contiguous() and link_.take(grad_weight):
        return None
    return grad_weight
