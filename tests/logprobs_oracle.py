"""Float64 oracles for the log-prob and PPO ops, written from the formulas, independent of
rlhf_kernels.reference; and the rounding-error bounds the tests use."""
import torch

U32 = 2.0 ** -24  # float32 unit roundoff
DTYPE_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
             torch.float64: 2.0 ** -53}


def logprobs64(logits, labels, temperature=1.0):
    """logp, entropy in float64; differentiable w.r.t. a float64 leaf."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    zy = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    z_finite = torch.where(torch.isfinite(z), z, torch.zeros_like(z))  # p = 0 there
    return zy - lse, lse - (p * z_finite).sum(-1)


def fwd_tolerance(logits, temperature, vocab, out_dtype=torch.float32):
    """Bound on |logp - exact| and |entropy - exact| for float32 math.

    z_y - lse loses u*(|z_y| + |lse|) in the subtraction; lse = m + log(s) where s is a float32
    sum of V terms in [0, 1] accumulated per SIMD lane / thread (depth about V/16 plus a
    reduction tree), each exp good to ~2 ulp: relative error of s below (V/16 + 64) * u."""
    if out_dtype == torch.float64:
        return 1e-10
    finite = logits.double()[torch.isfinite(logits.double())]
    zmax = (finite.abs().max().item() / temperature) if finite.numel() else 0.0
    return U32 * (vocab / 16 + 64) * (4 + 4 * zmax)


def grad_tolerance(grad_ref, fwd_tol, dtype, truncating=False, upstream=0.0):
    """grad = p * (...) with p = exp(z - lse): a lse error e gives a relative error ~e, and
    the grad is stored in the logits dtype: half an ulp of max |grad| when rounded to nearest,
    a whole ulp when truncated (the Triton interpreter casts float32 -> bfloat16 that way)."""
    gmax = grad_ref.abs().max().item()
    # upstream (a bound on |d loss / d logp| / T): the label's entry is (p_y - 1) * upstream,
    # whose p_y carries the same relative error and whose subtraction rounds once; with p_y
    # near 1 that error is not small next to max |grad|
    return (gmax * (4 * fwd_tol + DTYPE_ULP[dtype] * (2 if truncating else 1))
            + upstream * (4 * fwd_tol + U32) + 1e-12)
