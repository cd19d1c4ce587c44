"""The CUDA decode kernels (rlhf_kernels._C.decode_attention_cuda / sample_cuda), called
directly, against float64 / torch references.

decode_attention: the reference (rlhf_kernels.reference.decode_attention) runs in float64 on the
same (already rounded) inputs, so only the kernel's fp32 arithmetic and the final rounding to the
output dtype are measured: 2e-5 for float32 outputs (fp32 dot products over D <= 256 and a
softmax over a few thousand positions), plus half an ulp of the output dtype for bf16 / fp16
(|out| <= max |v| ~ 4: 2^-8 * 4 and 2^-11 * 4). Cache writes must be exact.

sample: tokens must equal rlhf_kernels.reference.sample.sample(..., uniforms=u) on the GPU,
except where u * total lies within a tiny tolerance of a CDF boundary (the kernel sums the
masses in a different order); the token must always be in the reference's kept set, and its
logprob within 1e-5 of log_softmax(z)[token].
"""
import math

import pytest
import torch

from conftest import CUDA_KERNEL_MARKS, cuda_extension
from decode_guard import check_guarded, guarded_case

from rlhf_kernels.reference.decode_attention import decode_attention as ref_attention
from rlhf_kernels.reference.sample import divide_by_temperature, kept_mask, sample as ref_sample

pytestmark = CUDA_KERNEL_MARKS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 4 * 2.0**-8 + 2e-5,
        torch.float16: 4 * 2.0**-11 + 2e-5}


@pytest.fixture(scope="module")
def C():
    return cuda_extension("decode_attention_cuda")


def run_attention(C, B, Hq, Hkv, D, S, dtype, lengths, starts, with_new, gen):
    dev = "cuda"
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(dev)
    k = (torch.randn(B, Hkv, S, D, generator=gen) * 2).to(dtype).to(dev)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype).to(dev)
    kn = torch.randn(B, Hkv, D, generator=gen).to(dtype).to(dev) if with_new else None
    vn = torch.randn(B, Hkv, D, generator=gen).to(dtype).to(dev) if with_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=dev)
    scale = 1.0 / math.sqrt(D)
    k_ref, v_ref = k.double(), v.double()
    want = ref_attention(q.double(), k_ref, v_ref, seqlens,
                         None if kn is None else kn.double(), None if vn is None else vn.double(),
                         cache_start=start, softmax_scale=scale)
    got = C.decode_attention_cuda(q, k, v, seqlens, kn, vn, start, scale)
    torch.cuda.synchronize()
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=0)
    # the cache write: exactly k_new / v_new at cache_seqlens, nothing else touched
    torch.testing.assert_close(k.double(), k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v.double(), v_ref, atol=0, rtol=0)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (12, 4), (6, 1), (14, 2), (32, 2)])
def test_attention_shapes(C, dtype, D, Hq, Hkv):
    gen = torch.Generator().manual_seed(D * 100 + Hq * 10 + Hkv)
    S = 300
    lengths = [0, 1, 299, 150]
    run_attention(C, 4, Hq, Hkv, D, S, dtype, lengths, None, False, gen)
    lengths = [0, 1, 299, 150]  # with k_new: attends to [0, len] and writes position len
    run_attention(C, 4, Hq, Hkv, D, S, dtype, lengths, None, True, gen)


@pytest.mark.parametrize("S", [1, 2, 127, 128, 129, 1000, 5000])
@pytest.mark.parametrize("with_new", [False, True])
def test_attention_lengths_and_splits(C, S, with_new):
    """S_max from 1 (one split) to 5000 (many splits, the new token in the last non-empty
    one); lengths 0 and full, and cache_start with empty rows."""
    gen = torch.Generator().manual_seed(S)
    full = S - 1 if with_new else S
    lengths = [0, full, max(full // 2, 0), min(1, full)]
    starts = [0, 0, min(3, lengths[2]), lengths[3] + (1 if with_new else 0)]  # last row: empty
    for starts_arg in (None, starts):
        run_attention(C, 4, 8, 2, 128, S, torch.bfloat16, lengths, starts_arg, with_new, gen)
        run_attention(C, 4, 8, 2, 64, S, torch.float32, lengths, starts_arg, with_new, gen)


def test_attention_empty_rows_are_zero(C):
    gen = torch.Generator().manual_seed(1)
    got = run_attention(C, 2, 4, 2, 64, 64, torch.float32, [0, 10], [0, 10], False, gen)
    assert torch.equal(got, torch.zeros_like(got))


def test_attention_out_of_range_lengths_stay_in_the_cache(C):
    """Lengths the Python op refuses (len = S with k_new, len < 0, start < 0), given to the
    kernel itself: clamped to the cache, nothing written outside it."""
    case = guarded_case("cuda")
    got = C.decode_attention_cuda(case["q"], *case["caches"], case["seqlens"], *case["new"],
                                  case["start"], 0.125)
    torch.cuda.synchronize()
    check_guarded(case, got, ATOL[torch.float32])


def test_attention_large_batch_one_split(C):
    gen = torch.Generator().manual_seed(2)
    lengths = [int(x) for x in torch.randint(0, 200, (64,), generator=gen)]
    run_attention(C, 64, 8, 8, 128, 256, torch.bfloat16, lengths, None, True, gen)


# ---------------------------------------------------------------------------------------- sample
def check_sample(C, logits, temperature, top_k, top_p, u):
    tok, lp = C.sample_cuda(logits, temperature, top_k, top_p, u)
    torch.cuda.synchronize()
    want_tok, _ = ref_sample(logits, temperature, top_k, top_p, uniforms=u)
    z = divide_by_temperature(logits, temperature)
    logp = torch.log_softmax(z.double(), -1)
    keep = kept_mask(z, top_k, top_p)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    rows = torch.arange(logits.shape[0], device=logits.device)
    assert keep[rows, tok].all(), "a token outside the kept set"
    torch.testing.assert_close(lp.double(), logp[rows, tok], atol=1e-5, rtol=0)
    # equal tokens, except where u * total is within a tiny tolerance of a CDF boundary
    probs = torch.where(keep, logp.exp(), 0.0)
    cdf = probs.cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    near = ((cdf - target).abs() < 1e-5 * cdf[:, -1:]).any(-1)
    bad = (tok != want_tok) & ~near
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()}: {tok[bad]} vs {want_tok[bad]}"
    return tok


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1000, 4097, 32000, 151936, 262144])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (50, 1.0), (0, 0.9), (40, 0.8),
                                         (0, 0.05), (5000, 0.95)])
def test_sample(C, dtype, V, top_k, top_p):
    gen = torch.Generator().manual_seed(V + top_k)
    B = 6
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    if V >= 8:
        logits[1, V // 2:] = -math.inf  # a padded vocabulary
        logits[2, 5] = 40.0             # one dominant token
    u = torch.rand(B, generator=gen)
    u[0] = 0.0
    u[3] = 1.0 - 2.0**-24
    for temperature in (1.0, 0.7):
        check_sample(C, logits.cuda(), temperature, top_k, top_p, u.cuda())


def test_sample_ties_at_kth(C):
    """top_k keeps every token tied with the k-th largest value."""
    V = 1000
    logits = torch.zeros(2, V)
    logits[:, 10:20] = 5.0  # ten tied maxima
    logits[:, 500] = 6.0
    u = torch.linspace(0, 0.999, 2)
    for k in (1, 2, 5, 11, 12):
        tok = check_sample(C, logits.cuda(), 1.0, k, 1.0, u.cuda())
        if 2 <= k <= 11:  # the k-th largest is a tied 5.0: exactly those and the 6.0 stay
            assert set(tok.tolist()) <= set(range(10, 20)) | {500}


def test_sample_greedy_like(C):
    """top_k = 1 and a tiny top_p return the argmax for any u."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5003, generator=gen).cuda()
    u = torch.rand(16, generator=gen).cuda()
    for top_k, top_p in ((1, 1.0), (0, 1e-6)):
        tok, _ = C.sample_cuda(logits, 1.0, top_k, top_p, u)
        assert torch.equal(tok, logits.argmax(-1))


def test_sample_inverse_cdf_index_order(C):
    """u sweeps the kept mass in index order: token boundaries at the cumulative masses."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(9, 1)
    u = torch.tensor([0.0, 0.05, 0.11, 0.25, 0.31, 0.55, 0.61, 0.95, 0.999])
    tok, _ = C.sample_cuda(logits.cuda(), 1.0, 0, 1.0, u.cuda())
    assert tok.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # top_p = 0.5: strictly-more mass of 0.3 is 0.4 < 0.5 (kept), of 0.2 is 0.7 (dropped)
    tok, _ = C.sample_cuda(logits.cuda(), 1.0, 0, 0.5, u.cuda())
    assert set(tok.tolist()) <= {2, 3}
