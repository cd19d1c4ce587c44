"""Triton decode attention and sampling (rlhf_kernels.triton.decode_attention / .sample).

Attention is checked against a float64 einsum softmax over the values the kernel sees (inputs
already in their dtype), plus the in-place cache append. Sampling is checked against the
reference kept set (rlhf_kernels.reference.sample.kept_mask) and a float64 inverse CDF given the
same uniforms: the token must be kept and its CDF interval must contain u * W, up to a small
tolerance for draws that land on a boundary; its logprob must match log_softmax in float64.
"""
import itertools
import math

import pytest
import torch


from conftest import TRITON_DEVICE, TRITON_KERNEL_MARKS  # noqa: E402
from decode_guard import check_guarded, guarded_case  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
from rlhf_kernels.reference.sample import divide_by_temperature, kept_mask  # noqa: E402
from rlhf_kernels.triton import decode_attention as dak  # noqa: E402
from rlhf_kernels.triton import sample as smk  # noqa: E402

pytestmark = TRITON_KERNEL_MARKS
DEV = TRITON_DEVICE
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# output rounding (the interpreter truncates to bfloat16: a whole ulp) plus, on a GPU, the
# probabilities rounded to the cache dtype for the P @ V dot
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}


def attention_f64(q, k, v, lengths, start, scale):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k) * scale
    pos = torch.arange(k.shape[2], device=q.device)
    visible = (pos[None] >= start[:, None]) & (pos[None] < lengths[:, None])
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), -1)
    return torch.einsum("bhs,bhsd->bhd", torch.nan_to_num(probs, nan=0.0), v)


def decode_case(seed, B, Hq, Hkv, D, S, dtype, with_new):
    rng = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=rng).to(dtype).to(DEV)
               for shape in ((B, Hq, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    hi = S - 1 if with_new else S  # the largest legal cache_seqlens
    seqlens = torch.randint(0, hi + 1, (B,), generator=rng, dtype=torch.int32)
    seqlens[0] = hi
    if B > 1:
        seqlens[1] = 0
    visible_end = seqlens + int(with_new)
    start = (torch.rand(B, generator=rng) * visible_end).to(torch.int32)
    if B > 2:
        start[2] = visible_end[2]  # nothing visible
    new = [torch.randn((B, Hkv, D), generator=rng).to(dtype).to(DEV) for _ in range(2)]
    return q, k, v, seqlens.to(DEV), start.to(DEV), new if with_new else [None, None]


CASES = list(itertools.product([(4, 4), (4, 2), (4, 1)], [16, 64, 80], [1, 17, 300],
                               [False, True]))


@pytest.mark.parametrize("heads,D,S,with_new", CASES)
def test_decode_attention(heads, D, S, with_new, monkeypatch):
    monkeypatch.setattr(dak, "SPLIT_MIN_LEN", 64)  # several splits at S = 300
    i = CASES.index((heads, D, S, with_new))
    dtype, B = DTYPES[i % 3], (1, 3)[i // 3 % 2]
    q, k, v, seqlens, start, (k_new, v_new) = decode_case(i, B, *heads, D, S, dtype, with_new)
    use_start = i % 4 != 0  # cache_start = None (= 0) now and then
    if not use_start:
        start = torch.zeros_like(start)
    k_in, v_in = k.clone(), v.clone()
    scale = 1.0 / math.sqrt(D)
    out = dak.decode_attention(q, k, v, seqlens, k_new, v_new, start if use_start else None,
                               scale)
    lengths = seqlens.long()
    if with_new:
        rows = torch.arange(B, device=DEV)
        k_in[rows, :, lengths] = k_new
        v_in[rows, :, lengths] = v_new
        lengths = lengths + 1
    assert torch.equal(k, k_in) and torch.equal(v, v_in), "cache append wrote the wrong place"
    expect = attention_f64(q, k_in, v_in, lengths, start.long(), scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype], rtol=TOL[dtype])
    empty = (lengths <= start.long()).nonzero()
    if len(empty):
        assert (out[empty[:, 0]] == 0).all()


def test_decode_attention_many_splits(monkeypatch):
    monkeypatch.setattr(dak, "SPLIT_MIN_LEN", 16)  # 19 splits, more than the 300 / 64 tiles
    q, k, v, seqlens, start, (k_new, v_new) = decode_case(7, 3, 4, 2, 64, 300, torch.float32,
                                                          True)
    out = dak.decode_attention(q, k, v, seqlens, k_new, v_new, start, 0.125)
    expect = attention_f64(q, k, v, seqlens.long() + 1, start.long(), 0.125)
    torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=2e-5)


def test_decode_attention_out_of_range_lengths_stay_in_the_cache(monkeypatch):
    """Lengths the Python op refuses (len = S with k_new, len < 0, start < 0), given to the
    launcher itself: clamped to the cache, nothing written outside it (several splits)."""
    monkeypatch.setattr(dak, "SPLIT_MIN_LEN", 16)
    case = guarded_case(DEV)
    got = dak.decode_attention(case["q"], *case["caches"], case["seqlens"], *case["new"],
                               case["start"], 0.125)
    check_guarded(case, got, TOL[torch.float32])


def check_sample(logits, temperature, top_k, top_p, u):
    tokens, logp = smk.sample(logits, temperature, top_k, top_p, u)
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
    z = divide_by_temperature(logits, temperature)
    keep = kept_mask(z, top_k, top_p)
    full = torch.log_softmax(z.double(), -1)
    probs = torch.where(keep, full.exp(), 0.0)
    cdf = probs.cumsum(-1)
    target = u.double() * cdf[:, -1]
    t = tokens[:, None]
    assert keep.gather(1, t).all(), "sampled a token outside the kept set"
    lower = (cdf - probs).gather(1, t)[:, 0]
    upper = cdf.gather(1, t)[:, 0]
    slack = 1e-5 * cdf[:, -1]
    assert ((target >= lower - slack) & (target <= upper + slack)).all(), (tokens, target)
    torch.testing.assert_close(logp.double(), full.gather(1, t)[:, 0], atol=1e-5, rtol=1e-6)
    return tokens


SAMPLE_CASES = [(V, k, p) for V in (1, 7, 1000) for k in (0, 1, 5) for p in (1.0, 0.9, 0.3)]
SAMPLE_CASES += [(5000, 0, 1.0), (5000, 5, 0.9), (5000, 0, 0.3)]


@pytest.mark.parametrize("V,top_k,top_p", SAMPLE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample(V, top_k, top_p, dtype, monkeypatch):
    monkeypatch.setattr(smk, "MAX_BLOCK_V", 512 if V <= 1000 else 2048)  # several chunks
    rng = torch.Generator().manual_seed(V * 100 + top_k * 10 + int(top_p * 10))
    logits = 3 * torch.randn(3, V, generator=rng)
    logits[1] = logits[1].round()  # many ties, including at the k-th value
    logits[2, : V // 2] = float("-inf")  # masked vocabulary entries
    u = torch.rand(3, generator=rng)
    u[0] = 0.999999
    tokens = check_sample(logits.to(dtype).to(DEV), 0.7, top_k, top_p, u.to(DEV))
    if top_k == 1:  # only the argmax (or a tie with it) survives
        z = logits.to(dtype).float()
        assert (z.gather(1, tokens[:, None].cpu()) == z.max(1, keepdim=True).values).all()


def test_sample_fp16_and_temperature():
    rng = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(2, 300, generator=rng)).to(torch.float16).to(DEV)
    for temperature in (0.3, 1.0, 2.5):
        check_sample(logits, temperature, 20, 0.8, torch.rand(2, generator=rng).to(DEV))
