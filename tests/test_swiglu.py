"""The SwiGLU kernels (csrc/cpu/swiglu.cpp) and their op (rlhf_kernels.ops.swiglu) against
float64, forward and backward, in both instruction-set builds (make test runs this file again
with RLHF_KERNELS_CPU_BASELINE=1)."""
import pytest
import torch

from rlhf_kernels import BackendUnavailable
from rlhf_kernels.ops.swiglu import swiglu
from rlhf_kernels.reference.swiglu import swiglu as reference

ext = pytest.importorskip("rlhf_kernels._C")

# a decode step, odd sizes (vector tails), a training minibatch's MLP, a 3-d input
SHAPES = [(1, 1), (1, 7), (3, 37), (480, 256), (2, 5, 96)]
# the vectorised exp is within ~2 ulp; sigmoid, the products and 1 + g (1 - s) add a few more
# roundings: 16 ulps of the output's terms (|g u|, |dy u| (1 + |g|), |dy g|)
ULPS = 16 * 2.0 ** -24


def inputs(shape, rng):
    # gates over the activation's whole range: large negative (sigmoid ~ 0), around 0, large
    gate = torch.randn(*shape, generator=rng) * 6
    gate.view(-1)[:3] = torch.tensor([-100.0, 0.0, 100.0])[:gate.numel()]
    return gate, torch.randn(*shape, generator=rng)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_matches_float64(rng, shape):
    gate, up = inputs(shape, rng)
    y = swiglu(gate, up)
    assert y.dtype == torch.float32 and y.shape == gate.shape and y.grad_fn is None
    want = reference(gate.double(), up.double())
    scale = (gate.double() * up.double()).abs()
    assert bool(((y.double() - want).abs() <= ULPS * scale + 1e-30).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_gradients_match_float64(rng, shape):
    gate, up = (t.requires_grad_() for t in inputs(shape, rng))
    dy = torch.randn(*shape, generator=rng)
    y = swiglu(gate, up)
    assert type(y.grad_fn).__name__ == "GeneratedBackwardFor_rlhf_kernels_swiglu_defaultBackward"
    d_gate, d_up = torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want_gate, want_up = torch.autograd.grad(reference(g64, u64), (g64, u64), dy.double())
    g, u, d = g64.detach(), u64.detach(), dy.double()
    for got, want, scale in ((d_gate, want_gate, (d * u).abs() * (1 + g.abs())),
                             (d_up, want_up, (d * g).abs())):
        assert bool(((got.double() - want).abs() <= ULPS * scale + 1e-30).all())


def test_cpu_gradcheck_and_partial_grads(rng):
    gate = torch.randn(3, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u), (gate, up))  # the reference
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float()
    swiglu(g32, u32).sum().backward()
    assert g32.grad is not None and u32.grad is None


def test_cpu_bad_input(rng):
    gate, up = torch.randn(2, 4, generator=rng), torch.randn(2, 4, generator=rng)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :3])
    with pytest.raises(ValueError, match="backend"):
        swiglu(gate, up, backend="cuda")
    with pytest.raises(BackendUnavailable, match="takes float32 tensors"):
        swiglu(gate.bfloat16(), up.bfloat16(), backend="cpu")
    assert torch.equal(swiglu(gate, up, backend="torch"), reference(gate, up))
    with pytest.raises(RuntimeError, match="float32 only"):
        ext.swiglu_cpu(gate.double(), up.double())
    with pytest.raises(RuntimeError, match="grad_y must be float32"):
        ext.swiglu_backward_cpu(torch.randn(2, 3), gate, up)
