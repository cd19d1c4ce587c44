"""GAE: every backend against a float64 oracle on fresh random inputs."""
import math

import numpy as np
import pytest
import torch

import rlhf_kernels
from conftest import backend_params, device_for
from gae_oracle import error_bound, gae_oracle

GAMMA_LAM = [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCAN_BACKENDS = ("triton", "cuda")  # evaluate the recursion as a tree: see error_bound


def make_inputs(rng, batch, length, dtype, holes=0.3, dead_row=True):
    r = torch.randn(batch, length, generator=rng).to(dtype)
    v = torch.randn(batch, length, generator=rng).to(dtype)
    m = torch.rand(batch, length, generator=rng) >= holes
    if dead_row and batch >= 3:
        m[1] = False  # a row with no valid token
    r[~m] = float("nan")  # padding is never read: NaN there must not leak out
    return r, v, m


def check(backend, r, v, m, gamma, lam, mode, whiten, **kw):
    dev = device_for(backend)
    adv, ret = rlhf_kernels.gae(r.to(dev), v.to(dev), m.to(dev), gamma=gamma, lam=lam,
                                mode=mode, whiten=whiten, backend=backend, **kw)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.shape == r.shape and ret.shape == r.shape
    adv, ret = adv.cpu().double().numpy(), ret.cpu().double().numpy()
    ref_adv, ref_ret = gae_oracle(r, v, m, gamma, lam, mode, whiten=False)
    depth = math.ceil(math.log2(max(r.shape[-1], 2))) if backend in SCAN_BACKENDS else 1
    tol = error_bound(r, v, m, ref_adv, gamma, lam, depth)
    mask = m.numpy()
    assert np.all(adv[~mask] == 0) and np.all(ret[~mask] == 0)
    np.testing.assert_allclose(ret, ref_ret, rtol=0, atol=tol + 2 ** -24 * np.abs(ref_ret).max())
    if not whiten:
        np.testing.assert_allclose(adv, ref_adv, rtol=0, atol=tol)
        return
    white, _ = gae_oracle(r, v, m, gamma, lam, mode, whiten=True)
    valid = ref_adv[mask]
    if valid.size < 2:  # nothing to whiten: every advantage is 0
        np.testing.assert_array_equal(adv, 0.0)
        return
    s = 1 / math.sqrt(valid.var(ddof=1) + 1e-8)
    spread = np.abs(valid - valid.mean()).max() * s
    # error of A propagated through (A - mean) * rsqrt(var + eps), plus the final roundings
    tol_w = tol * s * (2 + spread**2) + 4 * 2 ** -24 * np.abs(white).max(initial=0.0)
    np.testing.assert_allclose(adv, white, rtol=0, atol=tol_w)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("length", [1, 7, 128, 1000])
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("mode", ["zero", "skip"])
def test_gae_matches_float64(rng, backend, dtype, gamma, lam, length, batch, mode):
    if backend == "triton" and not torch.cuda.is_available() and (batch > 3 or length > 128):
        pytest.skip("Triton interpreter (no GPU): small shapes only; long rows are covered by test_gae_rows_longer_than_a_tile")
    r, v, m = make_inputs(rng, batch, length, dtype)
    for whiten in (False, True):
        check(backend, r, v, m, gamma, lam, mode, whiten)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("mode", ["zero", "skip"])
def test_gae_rows_longer_than_a_tile(rng, backend, mode):
    # several tiles per row (Triton tiles are 1024 wide, the CPU kernel's 64, CUDA's 1024)
    r, v, m = make_inputs(rng, 2, 2500, torch.float32)
    check(backend, r, v, m, 0.99, 0.95, mode, whiten=True)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("mode", ["zero", "skip"])
def test_gae_all_masked(backend, mode):
    r, v = torch.randn(3, 5), torch.randn(3, 5)
    m = torch.zeros(3, 5, dtype=torch.bool)
    dev = device_for(backend)
    for whiten in (False, True):
        adv, ret = rlhf_kernels.gae(r.to(dev), v.to(dev), m.to(dev), mode=mode, whiten=whiten,
                                    backend=backend)
        assert torch.all(adv == 0) and torch.all(ret == 0)


@pytest.mark.parametrize("backend", backend_params("gae"))
def test_gae_float64_inputs_and_default_mask(rng, backend):
    r = torch.randn(4, 33, generator=rng, dtype=torch.float64)
    v = torch.randn(4, 33, generator=rng, dtype=torch.float64)
    dev = device_for(backend)
    adv, ret = rlhf_kernels.gae(r.to(dev), v.to(dev), backend=backend)
    ref_adv, ref_ret = gae_oracle(r, v, torch.ones(4, 33, dtype=torch.bool), 1.0, 0.95, "zero",
                                  False)
    tol = error_bound(r, v, torch.ones(4, 33), ref_adv, 1.0, 0.95, 6)
    np.testing.assert_allclose(adv.cpu().numpy(), ref_adv, rtol=0, atol=tol)
    np.testing.assert_allclose(ret.cpu().numpy(), ref_ret, rtol=0, atol=tol * 2)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("mode", ["zero", "skip"])
@pytest.mark.parametrize("whiten", [False, True])
def test_gae_packed_equals_padded(rng, backend, mode, whiten):
    lengths = [5, 0, 17, 1, 64, 3]
    total = sum(lengths)
    r = torch.randn(total, generator=rng)
    v = torch.randn(total, generator=rng)
    m = torch.rand(total, generator=rng) > 0.25
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    width = max(lengths)
    rp, vp = torch.zeros(len(lengths), width), torch.zeros(len(lengths), width)
    mp = torch.zeros(len(lengths), width, dtype=torch.bool)
    inside = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        rp[b, :n], vp[b, :n], mp[b, :n] = r[s:s + n], v[s:s + n], m[s:s + n]
        inside[b, :n] = True
    dev = device_for(backend)
    kw = dict(gamma=0.99, lam=0.95, mode=mode, whiten=whiten, backend=backend)
    adv, ret = rlhf_kernels.gae(r.to(dev), v.to(dev), m.to(dev), cu_seqlens=cu.to(dev), **kw)
    adv_p, ret_p = rlhf_kernels.gae(rp.to(dev), vp.to(dev), mp.to(dev), **kw)
    keep = inside.to(dev)
    # same kernel, same arithmetic per row: packed and padded agree to float32 rounding
    torch.testing.assert_close(adv, adv_p[keep], rtol=0, atol=4e-6)
    torch.testing.assert_close(ret, ret_p[keep], rtol=0, atol=4e-6)


@pytest.mark.parametrize("backend", backend_params("gae"))
def test_gae_numeric_masks_equal_bool(rng, backend):
    r, v, m = make_inputs(rng, 3, 20, torch.float32)
    r = torch.where(m, r, 0.0)
    dev = device_for(backend)
    ref = rlhf_kernels.gae(r.to(dev), v.to(dev), m.to(dev), backend=backend)
    for dtype in (torch.int64, torch.float32, torch.uint8):
        out = rlhf_kernels.gae(r.to(dev), v.to(dev), m.to(dev, dtype), backend=backend)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_backends_agree_with_reference_backend(rng):
    # the torch backend is the documented ground truth: auto must give the same numbers
    r, v, m = make_inputs(rng, 16, 300, torch.float32)
    for mode in ("zero", "skip"):
        a_auto, _ = rlhf_kernels.gae(r, v, m, gamma=0.99, mode=mode)
        a_ref, _ = rlhf_kernels.gae(r, v, m, gamma=0.99, mode=mode, backend="torch")
        torch.testing.assert_close(a_auto, a_ref, rtol=0, atol=2e-5)


def test_benchmark_baselines_compute_the_same(rng):
    # the benchmark's loops must solve the same problem as the kernel they are compared with
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from gae_baselines import loop_gae_skip, loop_gae_zero

    r, v, m = make_inputs(rng, 8, 50, torch.float32, dead_row=False)
    r = torch.where(m, r, 0.0)
    for mode, loop in (("zero", loop_gae_zero), ("skip", loop_gae_skip)):
        adv, ret = loop(r, v, m.float(), 0.99, 0.95)
        ours_adv, ours_ret = rlhf_kernels.gae(r, v, m, gamma=0.99, lam=0.95, mode=mode)
        torch.testing.assert_close(torch.where(m, adv, 0.0), ours_adv, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.where(m, ret, 0.0), ours_ret, rtol=0, atol=1e-5)
