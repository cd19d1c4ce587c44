"""Fixes from the static review (issue 16, section 4), checked on every backend that runs here.

Sampling selection at signed zeros: -0.0 == +0.0, so top-k / top-p keep both or neither (the
contract in csrc/decode.h compares z values; the CUDA kernel's order key once put -0.0 below
+0.0 and dropped it). The temperature: z = logits / T is an IEEE float32 division by float32(T)
on every backend, never x * (1 / T), which is one ulp off at times and so moves ties at the
top-k boundary. GAE on empty input: a clear error through the public op on every backend.
Each row's expected token follows from the contract alone (u = 0: the first kept token; u near
1: the last), so a backend that keeps the wrong set picks another token.
"""
import numpy as np
import pytest
import torch

import rlhf_kernels
from conftest import (CUDA_KERNEL_MARKS, TRITON_DEVICE, TRITON_KERNEL_MARKS, backend_params,
                      device_for)
from rlhf_kernels.reference import sample as ref_sample

def _extension_kernel(entry):
    def kernel(*args):
        ext = pytest.importorskip("rlhf_kernels._C")
        if not hasattr(ext, entry):
            pytest.skip(f"rlhf_kernels._C was built without {entry}")
        return getattr(ext, entry)(*args)
    return kernel


def _triton_kernel(*args):
    from rlhf_kernels.triton import sample as triton_sample
    return triton_sample.sample(*args)


def _reference(logits, temperature, top_k, top_p, u):
    return ref_sample.sample(logits, temperature, top_k, top_p, uniforms=u)


# (name, kernel(logits, T, top_k, top_p, uniforms), device, marks)
SAMPLERS = [("torch", _reference, "cpu", []), ("cpu", _extension_kernel("sample_cpu"), "cpu", []),
            ("triton", _triton_kernel, TRITON_DEVICE, TRITON_KERNEL_MARKS),
            ("torch_cuda", _reference, "cuda", CUDA_KERNEL_MARKS),
            ("cuda", _extension_kernel("sample_cuda"), "cuda", CUDA_KERNEL_MARKS)]


def sampler_params():
    return [pytest.param(kernel, device, id=name, marks=marks)
            for name, kernel, device, marks in SAMPLERS]


def run(kernel, device, rows, temperature, top_k, top_p, u, dtype=torch.float32):
    logits = torch.stack(rows).to(dtype).to(device)
    uniforms = torch.tensor(u, dtype=torch.float32, device=device)
    tokens, logp = kernel(logits, temperature, top_k, top_p, uniforms)
    z = ref_sample.divide_by_temperature(logits.cpu(), temperature).double()
    want = torch.log_softmax(z, -1).gather(-1, tokens.cpu()[:, None])[:, 0]
    torch.testing.assert_close(logp.cpu().double(), want, atol=1e-5, rtol=0)
    return tokens.cpu().tolist()


def zero_tie_rows(rng, V=37):
    """(rows, top_k, top_p, u, expected tokens): signed zeros tied at the top-k / top-p cut,
    the rest of each row drawn below -3 (fresh per test)."""
    def row(**at):
        x = -3.0 - 6.0 * torch.rand(V, generator=rng)
        for i, value in at.items():
            x[int(i[1:])] = value
        return x
    # top_k = 2: the k-th largest z is 0, so every zero is kept
    topk = [row(i0=-0.0, i1=1.0, i2=0.0), row(i0=0.0, i1=1.0, i2=-0.0),
            row(i0=-0.0, i1=2.0, i2=0.0, i3=-0.0, i4=-0.0)]
    # top_p = 0.3: two zeros of mass ~1/2 each; nothing is strictly more probable: both kept
    topp = [row(i0=-0.0, i1=0.0), row(i0=0.0, i1=-0.0)]
    return [(topk, 2, 1.0, [0.0, 0.99, 0.0], [0, 2, 0]),
            (topp, 0, 0.3, [0.0, 0.99], [0, 1])]


@pytest.mark.parametrize("kernel,device", sampler_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_signed_zeros_tie_at_the_cut(rng, kernel, device, dtype, temperature):
    for rows, top_k, top_p, u, want in zero_tie_rows(rng):
        logits = torch.stack(rows)
        z = ref_sample.divide_by_temperature(logits.to(dtype), temperature)
        keep = ref_sample.kept_mask(z, top_k, top_p)
        assert keep[z == 0].all(), "the reference keeps every zero at the cut"
        got = run(kernel, device, rows, temperature, top_k, top_p, u, dtype)
        assert got == want, f"top_k={top_k} top_p={top_p}: tokens {got}, contract {want}"


def division_pairs(seed, n=200_000):
    """(x1, x2, T): adjacent float32 x1 < x2 where z1 == z2 under x / T but not under
    x * (1 / T) (tie_true), and the converse (tie_reciprocal), for both reciprocals a kernel
    might use: float32(1 / float32(T)) and float32(1 / double(T))."""
    gen = np.random.default_rng(seed)
    t = gen.uniform(0.3, 3.0, n).astype(np.float32)
    x1 = gen.uniform(-20, 20, n).astype(np.float32)
    x2 = np.nextafter(x1, np.float32(np.inf))
    r32 = np.float32(1) / t
    r64 = (1.0 / t.astype(np.float64)).astype(np.float32)
    true_tie = (x1 / t) == (x2 / t)
    recip_tie = ((x1 * r32) == (x2 * r32)) & ((x1 * r64) == (x2 * r64))
    recip_split = ((x1 * r32) != (x2 * r32)) & ((x1 * r64) != (x2 * r64))
    pairs = {}
    for name, hit in (("tie_true", true_tie & recip_split),
                      ("tie_reciprocal", ~true_tie & recip_tie)):
        i = np.flatnonzero(hit)
        assert len(i), f"seed {seed}: no {name} pair among {n} draws"
        pairs[name] = (float(x1[i[0]]), float(x2[i[0]]), float(t[i[0]]))
    return pairs


def test_reference_z_is_a_true_float32_division(rng):
    """Bit for bit, on values where x * (1 / T) != x / T."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    gen = np.random.default_rng(seed)
    for t in np.float32([0.7, 1.3, 2.9, float(gen.uniform(0.1, 5))]):
        x = gen.standard_normal(100_000).astype(np.float32) * 10
        differ = x[(x / t) != (x * (np.float32(1) / t))]
        assert len(differ) > 100, "the draw must hold values where the two conventions differ"
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            z = ref_sample.divide_by_temperature(torch.from_numpy(differ).to(device), float(t))
            assert np.array_equal(z.cpu().numpy().view(np.int32), (differ / t).view(np.int32)), \
                f"seed {seed}, T={t}, {device}"


@pytest.mark.parametrize("kernel,device", sampler_params())
def test_temperature_ties_follow_the_true_division(rng, kernel, device):
    """top_k = 1 keeps x1 only when x1 / T ties with x2 / T: u = 0 then picks x1 (token 0),
    else x2 (token 1)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    for name, (x1, x2, t) in division_pairs(seed).items():
        row = torch.tensor([x1, x2] + [-40.0] * 9)
        got = run(kernel, device, [row], t, 1, 1.0, [0.0])
        want = [0] if name == "tie_true" else [1]
        assert got == want, f"{name} (seed {seed}): x1={x1!r} x2={x2!r} T={t!r}: {got}"


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("shape,packed", [((0, 5), False), ((3, 0), False), ((0,), True)])
def test_gae_empty_input_is_a_clear_error(backend, shape, packed):
    device = device_for(backend)
    r = torch.zeros(shape, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device) if packed else None
    with pytest.raises(ValueError, match="empty"):
        rlhf_kernels.gae(r, r.clone(), cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize("entry", [pytest.param("gae_cpu", id="cpu"),
                                   pytest.param("gae_cuda", id="cuda", marks=CUDA_KERNEL_MARKS)])
def test_gae_kernel_on_empty_input_returns_empty(entry):
    """The C++ / CUDA entry points called directly (the op refuses empty input first): empty
    outputs, no flag, no division by zero on the host."""
    device = "cuda" if entry == "gae_cuda" else "cpu"
    e = torch.empty(0, device=device)
    m = torch.empty(0, dtype=torch.bool, device=device)
    fn = _extension_kernel(entry)
    for cu, row_len in ((None, 5), (torch.zeros(1, dtype=torch.int32, device=device), 0)):
        adv, ret, bad = fn(e, e, m, cu, row_len, 1.0, 0.95, False, True)
        assert adv.numel() == 0 and ret.numel() == 0 and int(bad.item()) == 0
