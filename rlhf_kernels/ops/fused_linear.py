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
  grad_hidden_c = g @ weight, grad_weight += g.T @ hidden_c. Four matmuls in all; the three
  of backward over the tokens whose output gradient is nonzero only (a caller that scores
  every position and masks the padding sends zeros for the rest).
- fused_linear_ppo_actor_loss: a token's loss depends on its own log-prob and entropy only (the
  aggregation weights come from the mask), so each chunk's gradient is known in the forward:
  it is computed there and backward only scales it. Three matmuls, as the unfused head.

Both are torch.library custom ops (rlhf_kernels::fused_linear_logprobs_fwd / _bwd,
rlhf_kernels::fused_linear_ppo_loss) with their autograd registered: torch.compile sees one
opaque node each, and the label range check (a host sync) runs inside them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _backends
from ..reference import ppo_loss as F
from . import _checks, tied_embedding
from .logprobs import check_label_range, check_labels, check_temperature, float_out
from .ppo_loss import PPOActorOutput, actor_loss_from_logprobs, check_ppo_inputs


SKIP_BELOW = 0.9  # the backward gathers the live rows when at most this share carries gradient


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """About as many logits per chunk as there are hidden activations in total (N*H), in a
    power of two between 32 and N: the chunk costs no more memory than the input itself."""
    target = max(1, math.ceil(n_tokens * hidden / vocab))
    return int(min(n_tokens, max(32, 1 << (target - 1).bit_length())))


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grad_buffers(hidden, weight):
    """grad_hidden, and a zeroed grad_weight accumulator (float32 for 16-bit weights)."""
    return torch.empty_like(hidden), torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype),
                                                 device=weight.device)


def _accumulate(g, h, weight, grad_hidden, grad_weight, part):
    """g = the chunk's grad-logits [c, V]: its share of grad_hidden and grad_weight."""
    grad_hidden[part] = g @ weight
    grad_weight.addmm_(g.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


@torch.library.custom_op("rlhf_kernels::fused_linear_logprobs_fwd", mutates_args=())
def fused_linear_logprobs_fwd(hidden: Tensor, weight: Tensor, labels: Tensor,
                              inv_temperature: float, chunk: int,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], labels [N] -> (logp, entropy, lse) [N]."""
    check_label_range(labels, weight.shape[0])
    forward, _ = _backends.kernel("logprobs", backend)
    n = hidden.shape[0]
    logp = hidden.new_empty(n, dtype=float_out(hidden.dtype))
    lse, ent = torch.empty_like(logp), torch.empty_like(logp)
    for s in range(0, n, chunk):
        logits = (hidden[s:s + chunk] @ weight.t()).unsqueeze(0)
        lp, en, ls = forward(logits, labels[None, s:s + chunk], inv_temperature, True)
        logp[s:s + chunk], ent[s:s + chunk], lse[s:s + chunk] = lp[0], en[0], ls[0]
    return logp, ent, lse


@fused_linear_logprobs_fwd.register_fake
def _(hidden, weight, labels, inv_temperature, chunk, backend):
    logp = hidden.new_empty(hidden.shape[0], dtype=float_out(hidden.dtype))
    return logp, torch.empty_like(logp), torch.empty_like(logp)


@torch.library.custom_op("rlhf_kernels::fused_linear_logprobs_bwd", mutates_args=())
def fused_linear_logprobs_bwd(hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
                              ent: Tensor, grad_logp: Tensor, grad_ent: Optional[Tensor],
                              inv_temperature: float, chunk: int,
                              backend: str) -> tuple[Tensor, Tensor]:
    """(grad_hidden, grad_weight): each chunk's logits recomputed, turned into grad-logits in
    place, then grad_hidden_c = g @ weight and grad_weight += g.T @ hidden_c."""
    _, backward = _backends.kernel("logprobs", backend)
    grad_hidden, grad_weight = _grad_buffers(hidden, weight)
    for s in range(0, hidden.shape[0], chunk):
        part = slice(s, s + chunk)
        h = hidden[part]
        logits = (h @ weight.t()).unsqueeze(0)
        ge = None if grad_ent is None else grad_ent[None, part]
        backward(logits, labels[None, part], lse[None, part], ent[None, part],
                 grad_logp[None, part], ge, inv_temperature, logits)  # in place
        _accumulate(logits[0], h, weight, grad_hidden, grad_weight, part)
    return grad_hidden, grad_weight.to(weight.dtype)


@fused_linear_logprobs_bwd.register_fake
def _(hidden, weight, labels, lse, ent, grad_logp, grad_ent, inv_temperature, chunk, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, labels, inv_temperature, chunk, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, labels, lse, ent)
    ctx.options = (inv_temperature, chunk, backend)
    ctx.set_materialize_grads(False)
    ctx.tied_embedding = tied_embedding.link(weight)


def _live_rows(grad_logp, grad_ent):
    """The rows with a nonzero output gradient, or None when that is most of them. A caller
    that scores every position and masks the padding (TRL's fused LM head off Triton scores
    the prompts too) sends zeros for those: their grad-logits, grad_hidden rows and share of
    grad_weight are exactly 0 (for finite logits), so their recompute and GEMMs are skipped."""
    if torch.compiler.is_compiling() or type(grad_logp) is not torch.Tensor \
            or _get_current_dispatch_mode() is not None:
        return None  # traced (fake, functional or proxy tensors): no data-dependent shapes
    live = grad_logp != 0
    if grad_ent is not None:
        live |= grad_ent != 0
    count = int(live.sum())
    return None if count > SKIP_BELOW * live.numel() else live.nonzero().squeeze(1)


def _logprobs_backward(ctx, grad_logp, grad_ent, _grad_lse):
    hidden, weight, labels, lse, ent = ctx.saved_tensors
    if grad_logp is None and grad_ent is None:
        return (None,) * 6
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    rows = _live_rows(grad_logp, grad_ent)
    if rows is None:
        grad_hidden, grad_weight = fused_linear_logprobs_bwd(hidden, weight, labels, lse, ent,
                                                             grad_logp, grad_ent, *ctx.options)
    else:  # only the tokens whose outputs carry gradient: the others' share is exactly 0
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        live_hidden, live_weight = fused_linear_logprobs_bwd(
            pick(hidden), weight, pick(labels), pick(lse), pick(ent), pick(grad_logp),
            pick(grad_ent), *ctx.options)
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, live_hidden)
        grad_weight = live_weight
    if ctx.needs_input_grad[1]:
        grad_weight = tied_embedding.hand_over(ctx.tied_embedding, grad_weight, weight.dtype)
    return grad_hidden, grad_weight, None, None, None, None


fused_linear_logprobs_fwd.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, k) for k in (
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
    if hasattr(torch._C.DispatchKey, k)]


def _token_loss_grad(loss_fn, logp, entropy):
    """((d loss / d logp, d loss / d entropy), loss) by autograd, inside the op. A custom op's
    kernel runs with the autograd dispatch keys excluded (its autograd is the registered one),
    where torch.autograd.grad records nothing and torch.func's wrappers fail under compile and
    opcheck; the keys are let back in for this [chunk]-sized computation only. (The PPO
    formulas stay in one place, reference/ppo_loss.py, rather than differentiated by hand.)"""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
    with guard, torch.enable_grad():
        lp, en = logp.detach().requires_grad_(), entropy.detach().requires_grad_()
        loss = loss_fn(lp, en)
        g_lp, g_en = torch.autograd.grad(loss, (lp, en), allow_unused=True)
    g_lp = torch.zeros_like(lp) if g_lp is None else g_lp
    return (g_lp, g_en), loss.detach()


@torch.library.custom_op("rlhf_kernels::fused_linear_ppo_loss", mutates_args=())
def fused_linear_ppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old: Tensor,
                          adv: Tensor, ref: Optional[Tensor], weights: Tensor,
                          inv_temperature: float, chunk: int, backend: str, clip_low: float,
                          clip_high: float, dual_clip: Optional[float], kl_coef: float,
                          kl_estimator: str, entropy_coef: float,
                          ratio_clamp: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp [N], entropy [N], grad_hidden, grad_weight): the loss and its gradient in
    one pass over the chunks (see the module docstring)."""
    check_label_range(labels, weight.shape[0])
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, ratio_clamp=ratio_clamp)
    forward, backward = _backends.kernel("logprobs", backend)
    n = hidden.shape[0]
    logp = hidden.new_empty(n, dtype=float_out(hidden.dtype))
    ent = torch.empty_like(logp)
    loss = logp.new_zeros(())
    grad_hidden, grad_weight = _grad_buffers(hidden, weight)
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        h, y = hidden[part], labels[None, part]
        logits = (h @ weight.t()).unsqueeze(0)
        lp, en, lse = forward(logits, y, inv_temperature, True)

        def chunk_loss(lp_, en_):  # the same per-token formulas as ppo_actor_loss
            token = F.actor_token_loss(
                lp_, en_, old[part].to(lp_.dtype), adv[part].to(lp_.dtype),
                ref_logp=None if ref is None else ref[part].to(lp_.dtype), **opts)[0]
            return (weights[part] * token).sum()
        (g_lp, g_en), value = _token_loss_grad(chunk_loss, lp[0], en[0])
        backward(logits, y, lse, None if g_en is None else en, g_lp[None],
                 None if g_en is None else g_en[None], inv_temperature, logits)
        _accumulate(logits[0], h, weight, grad_hidden, grad_weight, part)
        loss += value
        logp[part], ent[part] = lp[0], en[0]
    return loss, logp, ent, grad_hidden, grad_weight  # grad_weight in float32 for 16-bit


@fused_linear_ppo_loss.register_fake
def _(hidden, weight, labels, old, adv, ref, weights, *options):
    logp = hidden.new_empty(hidden.shape[0], dtype=float_out(hidden.dtype))
    return (logp.new_empty(()), logp, torch.empty_like(logp), torch.empty_like(hidden),
            weight.new_empty(weight.shape, dtype=_acc_dtype(weight.dtype)))


def _ppo_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])
    ctx.weight_dtype = inputs[1].dtype
    ctx.tied_embedding = tied_embedding.link(inputs[1])


def _ppo_backward(ctx, grad_loss, *_unused):
    grad_hidden, grad_weight = ctx.saved_tensors
    grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = tied_embedding.hand_over(ctx.tied_embedding, grad_weight, ctx.weight_dtype)
    return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight) + (None,) * 15


fused_linear_ppo_loss.register_autograd(_ppo_backward, setup_context=_ppo_setup)


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


def fused_linear_logprobs(hidden, weight, labels, *, temperature=1.0, return_entropy=False,
                          chunk_size=None, backend="auto"):
    _checks.real_tensors("fused_linear_logprobs", hidden=hidden, weight=weight, labels=labels)
    flat_h, weight, flat_y, chunk = _prepare(hidden, weight, labels, None, chunk_size)
    temperature = check_temperature(temperature)
    name = _checks.choose("logprobs", backend, flat_h.device, flat_h.dtype)
    logp, ent, _ = fused_linear_logprobs_fwd(flat_h, weight, flat_y, 1.0 / temperature, chunk,
                                             name)
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
    flat_mask = mask.reshape(-1)
    zero = torch.zeros((), device=hidden.device)
    old, adv, ref = (None if x is None else torch.where(flat_mask, x.reshape(-1).float(), zero)
                     for x in (old_logprobs, advantages, ref_logprobs))
    weights = F.aggregation_weights(mask, agg).reshape(-1)
    name = _checks.choose("logprobs", backend, flat_h.device, flat_h.dtype)
    loss, logp, ent, _, _ = fused_linear_ppo_loss(
        flat_h, weight, flat_y, old, adv, ref, weights, 1.0 / temperature, chunk, name,
        opts["clip_low"], opts["clip_high"], opts["dual_clip"], opts["kl_coef"],
        opts["kl_estimator"], opts["entropy_coef"], opts["ratio_clamp"])
    with torch.no_grad():
        out = actor_loss_from_logprobs(logp.view(shape), ent.view(shape), old_logprobs,
                                       advantages, mask, ref_logprobs=ref_logprobs, agg=agg,
                                       **opts)
    out.loss = loss  # the same value, with the gradient computed in the chunk pass
    return out
