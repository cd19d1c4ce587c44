"""logprobs: every backend against a float64 oracle, forward and backward."""
import pytest
import torch

import rlhf_kernels
from rlhf_kernels._backends import triton_interpret
from conftest import backend_params, device_for
from logprobs_oracle import fwd_tolerance, grad_tolerance, logprobs64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def small_for_interpreter(backend, vocab, batch, length):
    if backend == "triton" and not torch.cuda.is_available() and batch * length * vocab > 20000:
        pytest.skip("Triton interpreter (no GPU): small shapes only")


def make(rng, batch, length, vocab, dtype, scale=3.0):
    x = (torch.randn(batch, length, vocab, generator=rng) * scale).to(dtype)
    y = torch.randint(0, vocab, (batch, length), generator=rng)
    return x, y


def check_fwd_bwd(backend, x, y, temperature, entropy_grad, inplace=False):
    dev = device_for(backend)
    xd = x.to(dev).detach().clone().requires_grad_(not inplace)
    leaf = xd
    if inplace:  # in-place backward needs a non-leaf logits tensor (as from an LM head)
        base = x.to(dev).detach().clone().requires_grad_()
        xd = base * 1.0
    logp, ent = rlhf_kernels.logprobs(xd, y.to(dev), temperature=temperature,
                                      return_entropy=True, inplace_backward=inplace,
                                      backend=backend)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    x64 = x.double().requires_grad_()
    ref_logp, ref_ent = logprobs64(x64, y, temperature)
    tol = fwd_tolerance(x, temperature, x.shape[-1])
    torch.testing.assert_close(logp.cpu().double(), ref_logp.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), rtol=0, atol=tol)

    g_logp = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    g_ent = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    total = (logp * g_logp.to(dev)).sum()
    ref_total = (ref_logp * g_logp.double()).sum()
    if entropy_grad:
        total = total + (ent * g_ent.to(dev)).sum()
        ref_total = ref_total + (ref_ent * g_ent.double()).sum()
    total.backward()
    ref_total.backward()
    grad = (base.grad if inplace else leaf.grad).cpu().double()
    truncating = backend == "triton" and triton_interpret()
    upstream = g_logp.abs().max().item() / temperature
    torch.testing.assert_close(grad, x64.grad, rtol=0,
                               atol=grad_tolerance(x64.grad, tol, x.dtype, truncating, upstream))


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32000])
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_matches_float64(rng, backend, dtype, vocab, batch, length, temperature):
    small_for_interpreter(backend, vocab, batch, length)
    x, y = make(rng, batch, length, vocab, dtype)
    check_fwd_bwd(backend, x, y, temperature, entropy_grad=True)
    check_fwd_bwd(backend, x, y, temperature, entropy_grad=False)


@pytest.mark.parametrize("backend", backend_params("logprobs"))
def test_logprobs_strided_logits_and_inplace_backward(rng, backend):
    x, y = make(rng, 2, 6, 300, torch.float32)
    # logits[:, :-1] as trainers slice them: not contiguous, no copy needed
    check_fwd_bwd(backend, x[:, :-1], y[:, :-1], 1.0, entropy_grad=True)
    check_fwd_bwd(backend, x, y, 0.9, entropy_grad=True, inplace=True)


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprobs_gradient_keeps_strides_of_sliced_logits(rng, backend, dtype):
    """logits[:, :-1] of [B, T+1, V] with odd V (50257-like: rows not 16-byte aligned): the
    gradient is allocated with the logits' strides (row for row against the logits, as the
    kernels walk them) and matches float64; the dropped last position gets 0."""
    batch, length, vocab = 2, 4, 257
    dev = device_for(backend)
    full64 = (torch.randn(batch, length + 1, vocab, generator=rng) * 3).to(dtype).double()
    y = torch.randint(0, vocab, (batch, length), generator=rng)
    g_logp, g_ent = torch.randn(2, batch, length, generator=rng)
    full = full64.to(dtype).to(dev).requires_grad_()
    sliced = full[:, :-1]
    strides = []
    sliced.register_hook(lambda grad: strides.append(grad.stride()))
    logp, ent = rlhf_kernels.logprobs(sliced, y.to(dev), return_entropy=True, backend=backend)
    ((logp * g_logp.to(dev)).sum() + (ent * g_ent.to(dev)).sum()).backward()
    assert strides == [sliced.stride()]
    leaf = full64.requires_grad_()
    ref_logp, ref_ent = logprobs64(leaf[:, :-1], y)
    ((ref_logp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum()).backward()
    tol = fwd_tolerance(full64, 1.0, vocab)
    truncating = backend == "triton" and triton_interpret()
    torch.testing.assert_close(full.grad.cpu().double(), leaf.grad, rtol=0,
                               atol=grad_tolerance(leaf.grad, tol, dtype, truncating))
    assert torch.all(full.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", backend_params("logprobs"))
def test_logprobs_minus_inf_logits(rng, backend):
    x, y = make(rng, 2, 3, 500, torch.float32)
    x[0, 1, ::3] = float("-inf")  # masked vocabulary entries
    y[0, 1] = 1
    check_fwd_bwd(backend, x, y, 1.0, entropy_grad=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_logprobs_gradcheck_float64(rng, backend):
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=rng, requires_grad=True)
    y = torch.randint(0, 7, (2, 3), generator=rng)

    def f(x):
        logp, ent = rlhf_kernels.logprobs(x, y, temperature=0.8, return_entropy=True,
                                          backend=backend)
        return logp, ent

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_logprobs_2d_input(rng):
    x, y = make(rng, 1, 6, 50, torch.float32)
    a = rlhf_kernels.logprobs(x[0], y[0])
    b = rlhf_kernels.logprobs(x, y)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(y=torch.full((2, 3), 10)), ValueError, r"labels must be in \[0, 10\)"),
    (dict(y=torch.full((2, 3), -1)), ValueError, r"labels must be in \[0, 10\)"),
    (dict(y=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(y=torch.zeros(2, 3)), TypeError, "labels must be an integer"),
    (dict(x=torch.zeros(2, 3, 10, dtype=torch.int64)), TypeError, "logits must be a floating"),
    (dict(x=torch.zeros(2, 3, 4, 10)), ValueError, "logits must be"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(x=torch.zeros(0, 3, 10), y=torch.zeros(0, 3, dtype=torch.long)), ValueError, "empty"),
])
def test_logprobs_bad_input(kwargs, error, match):
    x = kwargs.pop("x", torch.randn(2, 3, 10))
    y = kwargs.pop("y", torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(error, match=match):
        rlhf_kernels.logprobs(x, y, **kwargs)
