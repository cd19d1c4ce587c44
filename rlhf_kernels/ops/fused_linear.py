"""LM head + log-probs (+ PPO loss) in token chunks: the [N, V] logits never exist at once.

    fused_linear_logprobs(hidden, weight, labels, *, temperature=1.0, return_entropy=False,
                          chunk_size=None, backend="auto")
    fused_linear_ppo_actor_loss(hidden, weight, labels, old_logprobs, advantages, mask, *,
                                <the options of ppo_actor_loss>, chunk_size=None, backend="auto")

hidden [B, T, H] (or [N, H]), weight [V, H] (the LM head, no bias). Per chunk of tokens,
logits = hidden_c @ weight.T, then the log-prob kernel. Peak extra memory: one [chunk, V]
logits block (plus a float32 grad-weight accumulator for low-precision weights).

- fused_linear_logprobs: only (logp, entropy, lse) per token are kept; backward recomputes each
  chunk's logits, turns them into grad-logits in place, and accumulates
  grad_hidden_c = g @ weight, grad_weight += g.T @ hidden_c. Four matmuls in all.
- fused_linear_ppo_actor_loss: a token's loss depends on its own log-prob and entropy only (the
  aggregation weights come from the mask), so each chunk's gradient is known in the forward:
  it is computed there and backward only scales it. Three matmuls, as the unfused head.
"""
from __future__ import annotations

import math

import torch

from .. import _backends
from ..reference import ppo_loss as F
from . import _checks
from .logprobs import check_labels, check_temperature, kernels
from .ppo_loss import PPOActorOutput, actor_loss_from_logprobs, check_ppo_inputs


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """About as many logits per chunk as there are hidden activations in total (N*H), in a
    power of two between 32 and N: the chunk costs no more memory than the input itself."""
    target = max(1, math.ceil(n_tokens * hidden / vocab))
    return int(min(n_tokens, max(32, 1 << (target - 1).bit_length())))


def _torch_kernels():
    from ..reference import logprobs as ref

    def fwd(logits, labels, inv_t, with_entropy):
        logp, ent = ref.logprobs(logits, labels, 1.0 / inv_t, True)
        lse = (logits.to(logp.dtype) * inv_t).logsumexp(-1)
        return logp, ent, lse

    def bwd(logits, labels, lse, ent, g_logp, g_ent, inv_t, grad):
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            logp, e = ref.logprobs(x, labels, 1.0 / inv_t, True)
            total = (logp * g_logp).sum() + ((e * g_ent).sum() if g_ent is not None else 0)
            grad.copy_(torch.autograd.grad(total, x)[0])
    return fwd, bwd


class FusedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature, with_entropy, chunk, backend):
        fwd, _ = _torch_kernels() if backend == "torch" else kernels(backend)
        n = hidden.shape[0]
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse, ent = torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).unsqueeze(0)
            lp, en, ls = fwd(logits, labels[None, s:s + chunk], inv_temperature, True)
            logp[s:s + chunk], ent[s:s + chunk], lse[s:s + chunk] = lp[0], en[0], ls[0]
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.inv_temperature, ctx.chunk, ctx.backend = inv_temperature, chunk, backend
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return (None,) * 7
        _, bwd = _torch_kernels() if ctx.backend == "torch" else kernels(ctx.backend)
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        chunk = ctx.chunk
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = (h @ weight.t()).unsqueeze(0)
            ge = None if grad_ent is None else grad_ent[None, s:s + chunk]
            bwd(logits, labels[None, s:s + chunk], lse[None, s:s + chunk],
                ent[None, s:s + chunk], grad_logp[None, s:s + chunk], ge,
                ctx.inv_temperature, logits)  # in place: the chunk's logits become its grad
            g = logits[0]
            grad_hidden[s:s + chunk] = g @ weight
            grad_weight.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


class FusedLinearPPOLoss(torch.autograd.Function):
    """Loss and its gradient in one pass over the chunks; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature, chunk, backend, token_loss,
                weights):
        fwd, bwd = _torch_kernels() if backend == "torch" else kernels(backend)
        n = hidden.shape[0]
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        ent = torch.empty_like(logp)
        loss = torch.zeros((), dtype=out_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk], labels[None, s:s + chunk]
            logits = (h @ weight.t()).unsqueeze(0)
            lp, en, lse = fwd(logits, y, inv_temperature, True)
            with torch.enable_grad():
                lp_, en_ = lp[0].detach().requires_grad_(), en[0].detach().requires_grad_()
                part = (weights[s:s + chunk] * token_loss(lp_, en_, slice(s, s + chunk))).sum()
                g_lp, g_en = torch.autograd.grad(part, (lp_, en_), allow_unused=True)
            g_lp = torch.zeros_like(lp_) if g_lp is None else g_lp
            bwd(logits, y, lse, en if g_en is not None else None, g_lp[None],
                None if g_en is None else g_en[None], inv_temperature, logits)
            g = logits[0]
            grad_hidden[s:s + chunk] = g @ weight
            grad_weight.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
            loss += part.detach()
            logp[s:s + chunk], ent[s:s + chunk] = lp[0], en[0]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype)
        return (grad_hidden * scale, (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def _prepare(hidden, weight, labels, mask, chunk_size):
    hidden = _checks.float_tensor("hidden", hidden)
    weight = _checks.float_tensor("weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last "
                         f"dim), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden is empty (shape {tuple(hidden.shape)})")
    _checks.same_device(hidden=hidden, weight=weight,
                        labels=labels if isinstance(labels, torch.Tensor) else None)
    labels = check_labels(labels, hidden.shape[:-1], weight.shape[0], mask)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    n = flat_h.shape[0]
    chunk = (default_chunk_size(n, hidden.shape[-1], weight.shape[0]) if chunk_size is None
             else chunk_size)
    if int(chunk) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return flat_h, weight, labels.reshape(-1), int(chunk)


def _run(flat_h, weight, labels, temperature, with_entropy, chunk, backend):
    name = _backends.resolve("logprobs", backend, flat_h.device)
    return FusedLinearLogProbs.apply(flat_h, weight, labels, 1.0 / temperature, with_entropy,
                                     chunk, name)


def fused_linear_logprobs(hidden, weight, labels, *, temperature=1.0, return_entropy=False,
                          chunk_size=None, backend="auto"):
    _checks.real_tensors("fused_linear_logprobs", hidden=hidden, weight=weight, labels=labels)
    flat_h, weight, flat_y, chunk = _prepare(hidden, weight, labels, None, chunk_size)
    temperature = check_temperature(temperature)
    logp, ent = _run(flat_h, weight, flat_y, temperature, return_entropy, chunk, backend)
    shape = hidden.shape[:-1]
    logp = logp.view(shape)
    return (logp, ent.view(shape)) if return_entropy else logp


def fused_linear_ppo_actor_loss(hidden, weight, labels, old_logprobs, advantages, mask, *,
                                clip_low=0.2, clip_high=0.2, dual_clip=None, ref_logprobs=None,
                                kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                                temperature=1.0, agg="token-mean", ratio_clamp=20.0,
                                chunk_size=None, backend="auto") -> PPOActorOutput:
    _checks.real_tensors("fused_linear_ppo_actor_loss", hidden=hidden, weight=weight,
                         labels=labels, old_logprobs=old_logprobs, advantages=advantages,
                         mask=mask, ref_logprobs=ref_logprobs)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be a [B, T, H] tensor")
    shape = hidden.shape[:-1]
    mask = _checks.mask_tensor("mask", mask, shape)
    flat_h, weight, flat_y, chunk = _prepare(hidden, weight, labels, mask, chunk_size)
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, ratio_clamp=ratio_clamp)
    old_logprobs, advantages, ref_logprobs, opts = check_ppo_inputs(
        shape, hidden.device, old_logprobs, advantages, ref_logprobs, agg=agg, **opts)
    temperature = check_temperature(temperature)
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    flat_mask = mask.reshape(-1)
    zero = torch.zeros((), device=hidden.device)
    old, adv, ref = (None if x is None else torch.where(flat_mask, flat(x).float(), zero)
                     for x in (old_logprobs, advantages, ref_logprobs))

    def token_loss(lp, en, part):  # the same per-token formulas as ppo_actor_loss
        return F.actor_token_loss(lp, en, old[part].to(lp.dtype), adv[part].to(lp.dtype),
                                  ref_logp=None if ref is None else ref[part].to(lp.dtype),
                                  **opts)[0]

    weights = F.aggregation_weights(mask, agg).reshape(-1)
    name = _backends.resolve("logprobs", backend, flat_h.device)
    loss, logp, ent = FusedLinearPPOLoss.apply(flat_h, weight, flat_y, 1.0 / temperature, chunk,
                                              name, token_loss, weights)
    with torch.no_grad():
        out = actor_loss_from_logprobs(logp.view(shape), ent.view(shape), old_logprobs,
                                       advantages, mask, ref_logprobs=ref_logprobs, agg=agg,
                                       **opts)
    out.loss = loss  # the same value, with the gradient computed in the chunk pass
    return out
