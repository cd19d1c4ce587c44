"""Token log-probs and entropy over the vocabulary in Triton, forward and backward.

Same contract as csrc/logprobs.h. Per row (b, t), with z = logits * inv_temperature in float32:
    lse = log sum_j exp(z_j),  p = exp(z - lse),  logp = z[label] - lse,
    entropy = lse - sum_j p_j z_j,
    grad_z_j = g_logp (1[j == label] - p_j) - g_ent p_j (z_j - lse + entropy)

One program per row. The forward streams the row once in BLOCK_V chunks with an online
log-sum-exp: a running max m, s = sum exp(z - m) and t = sum exp(z - m) z, both rescaled by
exp(m_old - m_new) when the max grows; then lse = m + log s and entropy = lse - t / s. Nothing of
size V is ever written. The label's logit is one extra scalar load (likely an L2 hit: it is in
the row just streamed), which is cheaper than a third block reduction per chunk to pick it out.
The backward reads each logit once and writes each gradient once, in the logits dtype, through
the gradient's own strides; each chunk is loaded before it is stored by the same program, so
grad_logits may be the logits tensor itself.

Vocab entries masked with -inf contribute exp(-inf) = 0 everywhere; the products 0 * -inf they
would produce are selected away, so a row stays finite while it has one finite logit.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # chunk of the vocabulary per loop step (tests lower it to get many chunks)


@triton.jit
def logprobs_fwd_kernel(logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr,
                        T, V, stride_b, stride_t, inv_temp,
                        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    base = logits_ptr + b * stride_b + (row - b * T) * stride_t  # int64: rows may be > 2^31 apart
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        # while every logit so far is -inf, shift by 0 instead: -inf - -inf would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        s = s * alpha + tl.sum(e, 0)
        if WITH_ENTROPY:
            # e == 0 covers z == -inf (and padding lanes), where e * z would be 0 * -inf = NaN
            t = t * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    z_label = tl.load(base + label).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_label - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, lse - t / s)


@triton.jit
def logprobs_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, grad_ptr,
                        T, V, stride_b, stride_t, gstride_b, gstride_t, inv_temp,
                        HAS_ENT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    base = logits_ptr + b * stride_b + t * stride_t
    gbase = grad_ptr + b * gstride_b + t * gstride_t
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(glogp_ptr + row)
    if HAS_ENT_GRAD:
        g_ent = tl.load(gent_ptr + row)
        # z - lse + entropy = z - E_p[z]
        centre = lse - tl.load(ent_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        inside = idx < V
        z = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        coef = g_logp
        if HAS_ENT_GRAD:
            # p == 0 where z == -inf: there z - centre would be -inf and p * (...) NaN
            coef = g_logp + g_ent * tl.where(p > 0, z - centre, 0.0)
        gz = tl.where(idx == label, g_logp, 0.0) - p * coef
        tl.store(gbase + idx, (gz * inv_temp).to(grad_ptr.dtype.element_ty), mask=inside)


def _launch_config(V):
    block = min(max(triton.next_power_of_2(V), 16), MAX_BLOCK_V)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, num_warps


def _check_logits(name, x):
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"{name} must be [B, T, V] with a contiguous last dimension, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")


def logprobs_fwd(logits, labels, inv_temperature: float, with_entropy: bool):
    """-> (logp [B, T] f32, entropy [B, T] f32 or an empty tensor, lse [B, T] f32)."""
    _check_logits("logits", logits)
    B, T, V = logits.shape
    labels = labels.contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else torch.empty(0, device=logits.device)
    if B * T == 0:
        return logp, ent, lse
    block, num_warps = _launch_config(V)
    logprobs_fwd_kernel[(B * T,)](
        logits, labels, logp, ent if with_entropy else lse, lse,
        T, V, logits.stride(0), logits.stride(1), float(inv_temperature),
        WITH_ENTROPY=bool(with_entropy), BLOCK_V=block, num_warps=num_warps)
    return logp, ent, lse


def logprobs_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature: float,
                 grad_logits) -> None:
    """Writes d(loss)/d(logits) into grad_logits (same shape and dtype as logits; may be logits).
    entropy and grad_entropy are None when the entropy has no gradient."""
    _check_logits("logits", logits)
    _check_logits("grad_logits", grad_logits)
    if grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype:
        raise ValueError("grad_logits must have the shape and dtype of logits")
    has_ent = grad_entropy is not None
    if has_ent and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    B, T, V = logits.shape
    if B * T == 0:
        return
    labels, lse = labels.contiguous(), lse.contiguous()
    grad_logp = grad_logp.float().contiguous()
    # without the entropy term its pointers are never read: any float32 tensor will do
    ent = entropy.contiguous() if has_ent else lse
    gent = grad_entropy.float().contiguous() if has_ent else lse
    block, num_warps = _launch_config(V)
    logprobs_bwd_kernel[(B * T,)](
        logits, labels, lse, ent, grad_logp, gent, grad_logits,
        T, V, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
        float(inv_temperature), HAS_ENT_GRAD=has_ent, BLOCK_V=block, num_warps=num_warps)


def aot_variants():
    """(kernel, signature, constexprs, num_warps) of the launches above, for the ahead-of-time
    compile check in tests/test_triton_aot.py: every dtype and flag, at the smallest, a middle
    and the largest BLOCK_V with the num_warps _launch_config pairs them with."""
    blocks = [(16, 1), (1024, 4), (MAX_BLOCK_V, 8)]
    for dtype in ("fp32", "bf16", "fp16"):
        for block, warps in blocks:
            for flag in (False, True):
                sig = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logp_ptr": "*fp32",
                       "ent_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "V": "i32",
                       "stride_b": "i64", "stride_t": "i64", "inv_temp": "fp32",
                       "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"}
                yield (logprobs_fwd_kernel, sig, {"WITH_ENTROPY": flag, "BLOCK_V": block},
                       warps)
                sig = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32",
                       "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32",
                       "grad_ptr": f"*{dtype}", "T": "i32", "V": "i32", "stride_b": "i64",
                       "stride_t": "i64", "gstride_b": "i64", "gstride_t": "i64",
                       "inv_temp": "fp32", "HAS_ENT_GRAD": "constexpr", "BLOCK_V": "constexpr"}
                yield (logprobs_bwd_kernel, sig, {"HAS_ENT_GRAD": flag, "BLOCK_V": block},
                       warps)
