"""The error bounds `python -m rlhf_kernels selftest` checks each op against: the same bounds the
test suite uses, gathered in one place (tests/test_selftest.py checks they agree with the
tests' own helpers). Each is a bound on the float32 rounding error of a kernel against the
float64 reference on the same inputs (already rounded to the input dtype), so none of them
grows with the input dtype's precision except where the output is stored in that dtype.

Elementwise bounds are returned as tensors, scalar ones as floats.
"""
import math

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
# unit roundoff of each dtype: the last rounding of a result stored in it (tests/test_decode.py
# ULP, tests/logprobs_oracle.py DTYPE_ULP)
DTYPE_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
             torch.float64: 2.0 ** -53}
# tests/test_swiglu.py ULPS: the vectorised exp (~2 ulp), sigmoid, the products and
# 1 + g (1 - s): 16 ulps of the terms
SWIGLU_ULPS = 16 * U32
# tests/test_ppo_loss.py test_critic_loss_matches_float64: float32 elementwise math and a sum
# over the tokens, a few ulps of the largest term (rtol, atol) for the loss and the gradient
CRITIC_LOSS_TOL = (1e-6, 1e-6)
CRITIC_GRAD_TOL = (1e-6, 1e-7)


def logprobs_fwd(logits: torch.Tensor, temperature: float) -> float:
    """|logp - exact| and |entropy - exact| (tests/logprobs_oracle.py fwd_tolerance): z_y - lse
    loses u (|z_y| + |lse|); lse's sum of V terms runs per lane / thread (depth ~V/16 plus a
    reduction tree), each exp good to ~2 ulp."""
    finite = logits.double()[torch.isfinite(logits.double())]
    zmax = finite.abs().max().item() / temperature if finite.numel() else 0.0
    return U32 * (logits.shape[-1] / 16 + 64) * (4 + 4 * zmax)


def logprobs_grad(grad_ref: torch.Tensor, fwd_tol: float, dtype, truncating: bool,
                  upstream: float = 0.0) -> float:
    """d/dlogits (tests/logprobs_oracle.py grad_tolerance): p = exp(z - lse) carries the lse
    error, then the grad is stored in the logits dtype: half an ulp rounded to nearest, a whole
    one when truncated (the Triton interpreter casts float32 -> bfloat16 that way)."""
    gmax = grad_ref.abs().max().item()
    # upstream (a bound on |d loss / d logp| / T): the label's entry is (p_y - 1) * upstream,
    # whose p_y carries the same relative error and whose subtraction rounds once; with p_y
    # near 1 that error is not small next to max |grad|
    return (gmax * (4 * fwd_tol + DTYPE_ULP[dtype] * (2 if truncating else 1))
            + upstream * (4 * fwd_tol + U32) + 1e-12)


def ppo_lipschitz(advantages: torch.Tensor, kl_coef: float) -> float:
    """|d loss / d logp| per token (tests/test_ppo_loss.py run_and_compare): |A| r with r <= 1.2
    off the clip, kl_coef (1 + e^|d|) and the entropy coefficient; it scales the log-prob
    bound into a bound on the loss and its gradient."""
    return 1.2 * advantages.abs().max().item() + 4 * kl_coef + 1


def fused_linear(hidden: torch.Tensor, weight: torch.Tensor) -> float:
    """Log-probs of h @ w.T (tests/test_fused_linear.py tolerance): the H-term dot products of
    the float32 logits, then the V-term log-prob pass; gradients get fused_linear_grad."""
    scale = (hidden.abs().max() * weight.abs().max()).item() * hidden.shape[-1]
    return U32 * (hidden.shape[-1] + weight.shape[0] / 16 + 64) * (8 + 8 * scale)


def fused_linear_grad(fwd_tol: float, grad_ref: torch.Tensor) -> float:
    """Grad of hidden or weight (tests/test_fused_linear.py): one more H- or N-term product."""
    return fwd_tol * (1 + grad_ref.abs().max().item()) * 10


def gae(rewards, values, mask, adv_ref, gamma: float, lam: float, scan: bool) -> float:
    """GAE advantages (tests/gae_oracle.py error_bound): each step rounds delta (3 operations on
    |r| + 2|v|) and the update (2 on |A|); later steps' errors are damped by (gamma lam)^k, so
    they add up over K = min(T, 1/(1 - gamma lam)) steps. A parallel scan (the cuda and triton
    kernels) adds up to log2(T) roundings per term."""
    length = rewards.shape[-1]
    depth = math.ceil(math.log2(max(length, 2))) if scan else 1
    c = gamma * lam
    steps = length if c >= 1 else min(length, 1.0 / (1.0 - c) + 1)
    m = mask.bool()
    inputs = (torch.where(m, rewards.double(), 0).abs()
              + 2 * torch.where(m, values.double(), 0).abs())
    scale = 2 * adv_ref.abs().max().item() + 3 * (inputs.max().item() if inputs.numel() else 0.0)
    return (depth + 1) * steps * U32 * scale + 1e-30


def gae_returns(adv_tol: float, returns_ref: torch.Tensor) -> float:
    """Returns = A + V (tests/test_gae.py check): the advantage bound plus one rounding."""
    return adv_tol + U32 * returns_ref.abs().max().item()


def decode_attention(out_ref: torch.Tensor, head_dim: int, s_max: int, dtype,
                     truncating: bool) -> float:
    """Decode attention (tests/test_decode.py): float32 dot products over D and sums over S,
    then the rounding to the output dtype (a whole ulp when the Triton interpreter truncates)."""
    rounding = DTYPE_ULP[dtype] * (2 if truncating else 1)
    return U32 * (head_dim + s_max) * 16 + rounding * out_ref.abs().max().item() + 1e-6


def sample_cdf_slack(vocab: int) -> float:
    """How far u may sit outside the drawn token's interval of the kept cdf (tests/test_decode.py
    test_sample_matches_reference_with_same_uniforms): float32 rounding of the cdf sums."""
    return 1e-5 * math.sqrt(vocab) + 1e-6


def rms_norm_fwd(out_ref: torch.Tensor, hidden: int) -> torch.Tensor:
    """tests/test_rms_norm.py: the fp32 sum of H squares is off by ~H u relative, halved by the
    sqrt: rtol (H + 4) u, atol 1e-6."""
    return (hidden + 4) * U32 * out_ref.abs() + 1e-6


def rms_norm_grad(rows: int, hidden: int, term: torch.Tensor) -> float:
    """tests/test_rms_norm.py test_cpu_op_gradients_match_float64: dx sums H products of size
    ~r |dy w|, dweight sums the rows' dy n: (H + rows + 8) ulps of the terms' size."""
    return (hidden + rows + 8) * U32 * term.abs().max().item()


def rope(scale: torch.Tensor) -> float:
    """tests/test_rope.py: two products and an add per element, |cos|, |sin| <= 1: within 2 ulps
    (4 u) of max |x| forward, of max |dy| backward."""
    return 4 * U32 * scale.abs().max().item()


def swiglu(scale: torch.Tensor) -> torch.Tensor:
    """tests/test_swiglu.py: 16 ulps of each element's terms (|g u| forward; |dy u| (1 + |g|)
    for d gate and |dy g| for d up)."""
    return SWIGLU_ULPS * scale.abs() + 1e-30
