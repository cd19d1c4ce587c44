"""The CUDA logprobs kernels (rlhf_kernels._C.logprobs_fwd_cuda / logprobs_bwd_cuda), called
directly, against a float64 torch reference: log_softmax of logits.double() * inv_t, gather,
entropy = -sum p * logp, gradients by autograd with random upstream gradients.

Tolerances (absolute). The reference sees the same (already rounded) logits as the kernel, so
only the kernel's arithmetic is measured:
  forward, float32 math (fp32/bf16/fp16 logits): z = logit * scale is rounded to float32
    (2^-24 relative, |z| <~ 40 -> ~2e-6 absolute), and s = sum exp(z - m) is a float32 sum over V:
    each thread adds about V / 256 terms (600 for V = 152064), then a 256-way tree, so its
    relative error -- the absolute error of log s, hence of lse and logp -- is at most about
    (V / 256 + 8) * 2^-24 ~ 4e-5 (exp2f adds 2 ulp per term); u / s in the entropy has the
    same relative error times |E_p[z - m]| <~ 5. 2e-4 covers these worst cases; a real bug
    (wrong scale, lost term, wrong merge) is off by 1e-2 or more.
  forward, float64: 1e-10.
  backward, relative to G = max(max|grad|, inv_t * max|g_logp|) (the second term keeps the
    scale honest for V = 1, where the exact gradient is 0 and the kernel's is g_logp * (1 - p)
    with p = 1 - O(2^-24)): p = exp(z - lse) inherits the forward's lse error (1e-4 at worst),
    so the float32 gradient is within ~2e-4 * G; it is then rounded once to the logits dtype,
    half an ulp: at most 2^-8 relative for bf16 (7 stored mantissa bits) and 2^-11 for fp16
    (10 bits), hence 2^-8 * G + 2e-4 * G and 2^-11 * G + 2e-4 * G. float64: 1e-10 * G.
"""
import math

import pytest
import torch

from conftest import CUDA_KERNEL_MARKS, cuda_extension

pytestmark = CUDA_KERNEL_MARKS

VOCABS = [1, 7, 1000, 4099, 32000, 152064]  # 7 and 4099: odd, rows start off 16-byte boundaries
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FWD_ATOL = {torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4, torch.float64: 1e-10}
BWD_REL = {torch.float32: 2e-4, torch.bfloat16: 2.0**-8 + 2e-4, torch.float16: 2.0**-11 + 2e-4,
           torch.float64: 1e-10}
B, T = 2, 4


@pytest.fixture(scope="module")
def C():
    return cuda_extension("logprobs_fwd_cuda")


def make_inputs(V, dtype, gen):
    """logits [B, T + 1, V] on the GPU (the kernels get the non-contiguous view [:, :-1]) and
    labels [B, T], with the label at both ends of a row, -inf logits and a peaked row."""
    full = torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 0], labels[0, 1] = V - 1, 0
    full[0, 2, labels[0, 2]] = 30.0  # p(label) ~ 1: logp ~ 0 must not cancel
    if V >= 2:
        half = (V + 1) // 2  # a padded vocabulary: the upper half is -inf
        full[1, 0, half:] = -math.inf
        labels[1, 0] = int(torch.randint(0, half, (1,), generator=gen))
        mask = torch.rand(V, generator=gen) < 0.1  # scattered -inf, never on the label
        mask[labels[1, 1]] = False
        full[1, 1, mask] = -math.inf
    return full.to(dtype).cuda(), labels.cuda()


def reference(logits, labels, inv_t, g_logp, g_ent):
    z = logits.detach().double().requires_grad_(True)
    logp_all = torch.log_softmax(z * inv_t, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # p * logp is 0 where p = 0 (logit -inf); the where keeps 0 * (-inf) out of value and grad
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    lse = torch.logsumexp(z * inv_t, dim=-1)
    loss = (logp * g_logp.double()).sum()
    grad_lp, = torch.autograd.grad(loss, z, retain_graph=True)
    grad_all, = torch.autograd.grad(loss + (ent * g_ent.double()).sum(), z)
    return logp.detach(), ent.detach(), lse.detach(), grad_lp, grad_all


def check_grad(actual, expected, dtype, inv_t, g_logp, what):
    scale = max(expected.abs().max().item(), inv_t * g_logp.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=BWD_REL[dtype] * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_cuda_matches_float64_reference(C, V, dtype, temperature):
    gen = torch.Generator().manual_seed(1000 * V + DTYPES.index(dtype) + int(10 * temperature))
    full, labels = make_inputs(V, dtype, gen)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    inv_t = 1.0 / temperature
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_logp = torch.randn(B, T, generator=gen, dtype=acc).cuda()
    g_ent = torch.randn(B, T, generator=gen, dtype=acc).cuda()
    ref_logp, ref_ent, ref_lse, ref_grad_lp, ref_grad = reference(logits, labels, inv_t, g_logp,
                                                                  g_ent)

    logp, ent, lse = C.logprobs_fwd_cuda(logits, labels, inv_t, True)
    torch.cuda.synchronize()
    for name, got, want in (("logp", logp, ref_logp), ("entropy", ent, ref_ent),
                            ("lse", lse, ref_lse)):
        assert got.dtype == acc and got.shape == (B, T), name
        torch.testing.assert_close(got.double(), want, rtol=0, atol=FWD_ATOL[dtype],
                                   msg=lambda m: f"{name}: {m}")
    logp2, ent2, lse2 = C.logprobs_fwd_cuda(logits, labels, inv_t, False)
    assert ent2.numel() == 0
    assert torch.equal(logp2, logp) and torch.equal(lse2, lse)

    # out of place, dense grad_logits: other row strides than the sliced logits
    grad = torch.empty(B, T, V, dtype=dtype, device="cuda")
    C.logprobs_bwd_cuda(logits, labels, lse, ent, g_logp, g_ent, inv_t, grad)
    check_grad(grad, ref_grad, dtype, inv_t, g_logp, "grad (dense)")
    neg_inf = torch.isinf(logits) & (logits < 0)
    assert (grad[neg_inf] == 0).all()

    # out of place into a padded buffer: rows start one element off, NaN sentinels around
    pad = torch.full((B, T, V + 3), math.nan, dtype=dtype, device="cuda")
    grad_off = pad[:, :, 1:V + 1]
    C.logprobs_bwd_cuda(logits, labels, lse, None, g_logp, None, inv_t, grad_off)
    check_grad(grad_off, ref_grad_lp, dtype, inv_t, g_logp, "grad without entropy (offset)")
    assert pad[:, :, 0].isnan().all() and pad[:, :, V + 1:].isnan().all()

    # in place: grad_logits is the logits view; the padding row t = T must stay as it was
    before = full.clone()
    inplace = full.clone()
    x = inplace[:, :-1]
    C.logprobs_bwd_cuda(x, labels, lse, ent, g_logp, g_ent, inv_t, x)
    check_grad(x, ref_grad, dtype, inv_t, g_logp, "grad (in place)")
    assert torch.equal(inplace[:, -1], before[:, -1])


def test_logprobs_cuda_rejects_bad_layouts(C):
    logits = torch.randn(2, 3, 8, device="cuda")
    labels = torch.zeros(2, 3, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        C.logprobs_fwd_cuda(logits.transpose(1, 2), labels.new_zeros(2, 8), 1.0, True)
    with pytest.raises(RuntimeError, match="labels must be contiguous int64"):
        C.logprobs_fwd_cuda(logits, labels.int(), 1.0, True)
    with pytest.raises(RuntimeError, match="same device"):
        C.logprobs_fwd_cuda(logits, labels.cpu(), 1.0, True)
