"""decode_attention and sample: every backend against float64 / reference computations."""
import math

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _backends
from rlhf_kernels._backends import triton_interpret
from rlhf_kernels.ops.decode import CUDA_HEAD_DIMS
from rlhf_kernels.reference import sample as ref_sample
from conftest import backend_params, device_for
from logprobs_oracle import fwd_tolerance

ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def attention64(q, k, v, lengths, start, scale):
    """Float64 attention of each query head over its visible cache positions."""
    batch, hq, dim = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, dim, dtype=torch.float64)
    for b in range(batch):
        lo, hi = int(start[b]), int(lengths[b])
        if hi <= lo:
            continue
        for h in range(hq):
            keys = k[b, h // group, lo:hi].double()
            p = torch.softmax(keys @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v[b, h // group, lo:hi].double()
    return out


@pytest.mark.parametrize("backend", backend_params("decode_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("dim", [16, 64, 80])
@pytest.mark.parametrize("s_max", [1, 17, 300])
@pytest.mark.parametrize("append", [False, True])
def test_decode_attention_matches_float64(rng, backend, dtype, heads, dim, s_max, append):
    if backend == "triton" and not torch.cuda.is_available() and (s_max > 17 or dim > 16):
        pytest.skip("Triton interpreter (no GPU): small shapes only")
    if backend == "cuda" and dim not in CUDA_HEAD_DIMS:
        pytest.skip(f"the CUDA kernel supports head dims {CUDA_HEAD_DIMS}")
    batch, (hq, hkv) = 3, heads
    q = torch.randn(batch, hq, dim, generator=rng).to(dtype)
    k = torch.randn(batch, hkv, s_max, dim, generator=rng).to(dtype)
    v = torch.randn(batch, hkv, s_max, dim, generator=rng).to(dtype)
    room = s_max - 1 if append else s_max
    lengths = torch.randint(0, room + 1, (batch,), generator=rng, dtype=torch.int32)
    lengths[0] = room  # a full cache
    start = torch.randint(0, 3, (batch,), generator=rng, dtype=torch.int32)
    start[1] = s_max  # nothing visible: the output is 0
    k_new = torch.randn(batch, hkv, dim, generator=rng).to(dtype) if append else None
    v_new = torch.randn(batch, hkv, dim, generator=rng).to(dtype) if append else None
    dev = device_for(backend)
    kd, vd = k.clone().to(dev), v.clone().to(dev)
    out = rlhf_kernels.decode_attention(
        q.to(dev), kd, vd, lengths.to(dev), None if k_new is None else k_new.to(dev),
        None if v_new is None else v_new.to(dev), cache_start=start.to(dev), backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    k_ref, v_ref = k.clone(), v.clone()
    seen = lengths.clone()
    if append:
        for b in range(batch):
            k_ref[b, :, lengths[b]] = k_new[b]
            v_ref[b, :, lengths[b]] = v_new[b]
        seen = lengths + 1
    # the cache holds exactly the new tokens at their positions, and nothing else changed
    assert torch.equal(kd.cpu(), k_ref) and torch.equal(vd.cpu(), v_ref)
    want = attention64(q, k_ref, v_ref, seen, start, 1 / math.sqrt(dim))
    # float32 dot products over D and sums over S, then rounding to the output dtype (a whole
    # ulp under the Triton interpreter, which truncates float32 -> bfloat16)
    rounding = ULP[dtype] * (2 if backend == "triton" and triton_interpret() else 1)
    tol = 2.0 ** -24 * (dim + s_max) * 16 + rounding * want.abs().max().item()
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=tol + 1e-6)
    assert torch.all(out[1].cpu() == 0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q_shape=(2, 4)), ValueError, "q must be"),
    (dict(heads=3), ValueError, "multiple of the cache's KV heads"),
    (dict(lengths=[4, 9]), ValueError, r"cache_seqlens must be in \[0, 8\]"),
    (dict(lengths=[8, 2], append=True), ValueError, r"cache_seqlens must be in \[0, 7\]"),
    (dict(lengths_dtype=torch.float32), TypeError, "cache_seqlens must be int32"),
    (dict(only_k_new=True), ValueError, "k_new and v_new must be given together"),
    (dict(cache_dtype=torch.float16), TypeError, "k_cache dtype"),
    (dict(noncontiguous=True), ValueError, "k_cache must be contiguous"),
])
def test_decode_attention_bad_input(kwargs, error, match):
    q = torch.randn(*kwargs.pop("q_shape", (2, kwargs.pop("heads", 4), 8)))
    dtype = kwargs.pop("cache_dtype", torch.float32)
    k = torch.randn(2, 2, 8, 8, dtype=dtype)
    if kwargs.pop("noncontiguous", False):
        k = torch.randn(2, 2, 8, 16)[..., ::2]
    v = torch.randn(2, 2, 8, 8, dtype=dtype)
    lengths = torch.tensor(kwargs.pop("lengths", [1, 2]), dtype=kwargs.pop("lengths_dtype",
                                                                         torch.int32))
    append = kwargs.pop("append", False) or kwargs.get("only_k_new", False)
    k_new = torch.randn(2, 2, 8) if append else None
    v_new = None if kwargs.pop("only_k_new", False) else k_new
    with pytest.raises(error, match=match):
        rlhf_kernels.decode_attention(q, k, v, lengths, k_new, v_new)


def kept_set(logits, temperature, top_k, top_p):
    return ref_sample.kept_mask(logits.float() / temperature, top_k, top_p)


@pytest.mark.parametrize("backend", backend_params("sample"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5000])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.9), (0, 0.3),
                                         (5, 0.9)])
def test_sample_matches_reference_with_same_uniforms(rng, backend, dtype, vocab, top_k, top_p):
    if backend == "triton" and not torch.cuda.is_available() and vocab > 1000:
        pytest.skip("Triton interpreter (no GPU): small shapes only")
    logits = (torch.randn(4, vocab, generator=rng) * 3).to(dtype)
    if vocab >= 7:
        logits[3, :4] = logits[3].max()  # ties at the top
    u = torch.rand(4, generator=rng)
    dev = device_for(backend)
    name = _kernel_call(backend)
    tokens, logp = name(logits.to(dev), 0.8, top_k, top_p, u.to(dev))
    tokens, logp = tokens.cpu(), logp.cpu()
    z = logits.float() / 0.8
    keep = kept_set(logits, 0.8, top_k, top_p)
    assert torch.all(keep.gather(-1, tokens[:, None])), "a token outside the kept set"
    want = torch.log_softmax(z.double(), -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), want, rtol=0,
                               atol=fwd_tolerance(logits, 0.8, vocab))
    # the token's interval of the kept cdf contains u (up to float32 rounding of the sums)
    probs = torch.where(keep, torch.softmax(z, -1), 0.0).double()
    cdf = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
    hi = cdf.gather(-1, tokens[:, None])[:, 0]
    lo = hi - (probs / probs.sum(-1, keepdim=True)).gather(-1, tokens[:, None])[:, 0]
    slack = 1e-5 * math.sqrt(vocab) + 1e-6
    assert torch.all((u.double() >= lo - slack) & (u.double() <= hi + slack))


def _kernel_call(backend):
    return _backends.kernel("sample", backend)[0]


@pytest.mark.parametrize("backend", backend_params("sample"))
def test_sample_frequencies_and_reproducibility(backend):
    if backend == "triton" and triton_interpret():
        pytest.skip("Triton interpreter (no GPU): 20k rows of bisection take minutes; the "
                    "interpreter run checks kept sets and the cdf in test_sample_matches_...")
    dev = device_for(backend)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])).repeat(4000, 1).to(dev)
    draw = lambda seed, **kw: rlhf_kernels.sample(  # noqa: E731
        logits, generator=torch.Generator(device=dev).manual_seed(seed), backend=backend, **kw)
    a, _ = draw(0, top_k=3)
    b, _ = draw(0, top_k=3)
    assert torch.equal(a, b), "the same seed must give the same draws"
    for kwargs, probs in ((dict(), [0.4, 0.3, 0.15, 0.1, 0.05]),
                          (dict(top_k=3), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
                          (dict(top_p=0.6), [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])):
        tokens, _ = draw(1, **kwargs)
        counts = torch.bincount(tokens.cpu(), minlength=5).double()
        expected = torch.tensor(probs, dtype=torch.float64) * tokens.numel()
        assert torch.all(counts[expected == 0] == 0), f"{kwargs}: a token outside the kept set"
        keep = expected > 0
        # Pearson chi-square, df <= 4: 30 is far beyond the 0.9999 quantile (23.5)
        chi2 = (((counts - expected)[keep]) ** 2 / expected[keep]).sum().item()
        assert chi2 < 30, f"{kwargs}: frequencies {counts.tolist()} vs {expected.tolist()}"


def test_sample_greedy_and_bad_input():
    logits = torch.randn(3, 11)
    tokens, logp = rlhf_kernels.sample(logits, temperature=0)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).max(-1).values)
    for kwargs, match in ((dict(temperature=-1), "temperature must be"),
                          (dict(top_k=-2), "top_k must be"), (dict(top_p=0.0), "top_p must be"),
                          (dict(top_p=1.5), "top_p must be")):
        with pytest.raises(ValueError, match=match):
            rlhf_kernels.sample(logits, **kwargs)
    with pytest.raises(TypeError, match="logits must be a floating"):
        rlhf_kernels.sample(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be a non-empty"):
        rlhf_kernels.sample(torch.zeros(0, 3))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 3, 50])
def test_reference_kept_set_is_the_definition(rng, top_k, top_p):
    # brute force over pairs: kept iff among the top_k values (ties kept) and the mass of the
    # strictly more probable tokens is below top_p
    z = torch.randint(-3, 3, (3, 40), generator=rng).float()  # many ties
    keep = ref_sample.kept_mask(z, top_k, top_p)
    p = torch.softmax(z, -1)
    for b in range(3):
        for i in range(40):
            rank_ok = top_k == 0 or int((z[b] > z[b, i]).sum()) < top_k
            mass_ok = top_p >= 1.0 or float(p[b][p[b] > p[b, i]].sum()) < top_p
            assert bool(keep[b, i]) == (rank_ok and mass_ok), (b, i)


def test_cuda_head_dims_listed_once():
    """The Python list of the CUDA decode kernel's head dims is the one csrc/decode.h holds
    (the extension exports it, CUDA build or not)."""
    ext, why = _backends.extension()
    if ext is None:
        pytest.skip(f"needs the extension: {why}")
    assert tuple(ext.decode_cuda_head_dims) == CUDA_HEAD_DIMS == _backends.DECODE_CUDA_HEAD_DIMS
