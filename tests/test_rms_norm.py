"""The RMSNorm kernels (csrc/cpu/rms_norm.cpp, forward and backward) and their op
(rlhf_kernels.ops.rms_norm) against float64, in both instruction-set builds (make test runs
this file again with RLHF_KERNELS_CPU_BASELINE=1)."""
import pytest
import torch

from rlhf_kernels import BackendUnavailable
from rlhf_kernels.generation.adapters.base import fused_rms_norm, rms_norm
from rlhf_kernels.ops.rms_norm import rms_norm as rms_norm_op

ext = pytest.importorskip("rlhf_kernels._C")


def reference(x, w, eps):
    x, w = x.double(), w.double()
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1, 64), (33, 128), (8, 576), (2, 5, 4, 64)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_cpu_rms_norm_matches_float64(rng, shape, eps):
    x = torch.randn(*shape, generator=rng) * 3
    w = torch.randn(shape[-1], generator=rng)
    y = ext.rms_norm_cpu(x, w, eps)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # |y| = |w| * O(1); the fp32 sum of H squares is off by ~H eps relative, halved by the sqrt
    h = shape[-1]
    torch.testing.assert_close(y.double(), reference(x, w, eps), rtol=(h + 4) * 2.0 ** -24,
                               atol=1e-6)


def test_cpu_rms_norm_zero_rows_and_strided_input(rng):
    w = torch.randn(16, generator=rng)
    assert ext.rms_norm_cpu(torch.zeros(0, 16), w, 1e-6).shape == (0, 16)
    zeros = ext.rms_norm_cpu(torch.zeros(2, 16), w, 1e-6)  # mean 0: y = 0, not NaN
    assert torch.equal(zeros, torch.zeros(2, 16))
    x = torch.randn(4, 32, generator=rng)[:, ::2]  # a non-contiguous view
    torch.testing.assert_close(ext.rms_norm_cpu(x, w, 1e-6), rms_norm(x, w, 1e-6))


def test_adapter_norm_takes_the_kernel_for_float32_cpu_only(rng):
    norm = fused_rms_norm("auto", torch.device("cpu"), torch.float32)
    assert norm is not None
    assert fused_rms_norm("torch", torch.device("cpu"), torch.float32) is None
    assert fused_rms_norm("auto", torch.device("cpu"), torch.bfloat16) is None
    x = torch.randn(3, 8, generator=rng).bfloat16()
    w = torch.randn(8, generator=rng).bfloat16()
    assert torch.equal(norm(x, w, 1e-6), rms_norm(x, w, 1e-6))  # other dtypes: the ATen ops


SHAPES = [(1, 1), (3, 7), (1, 64), (33, 128), (300, 96), (2, 5, 4, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_op_gradients_match_float64(rng, shape):
    """dx = r (g - n mean(g n)) and dweight = sum_rows dy n against float64 autograd of the
    reference. fp32: dx sums H products of size ~r |dy w| (and cancels: H = 1 gives ~0), and
    dweight sums the rows' dy n, so the bound is (H + rows + 8) ulps of the terms' size."""
    x = (torch.randn(*shape, generator=rng) * 3).requires_grad_()
    w = torch.randn(shape[-1], generator=rng).requires_grad_()
    dy = torch.randn(*shape, generator=rng)
    y = rms_norm_op(x, w, 1e-6)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "GeneratedBackwardFor_rlhf_kernels_rms_norm_defaultBackward"
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want_dx, want_dw = torch.autograd.grad(reference(x64, w64, 1e-6), (x64, w64), dy.double())
    r = torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    ulps = (shape[-1] + x.numel() // shape[-1] + 8) * 2.0 ** -24
    terms = {"dx": (dy.double() * w64.detach() * r).abs().max().item(),
             "dw": (dy.double() * x64.detach() * r).abs().max().item()}
    torch.testing.assert_close(dx.double(), want_dx, atol=ulps * terms["dx"], rtol=0)
    torch.testing.assert_close(dw.double(), want_dw, atol=ulps * terms["dw"], rtol=0)


def test_cpu_op_gradcheck_and_partial_grads(rng):
    """gradcheck in float64 runs the reference (the kernels are float32 only); the float32
    kernel path with only x (or only weight) needing grad returns the other as None."""
    x = torch.randn(4, 6, dtype=torch.float64, generator=rng, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_op(a, b, 1e-5), (x, w))
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float()
    rms_norm_op(x32, w32, 1e-5).sum().backward()
    assert x32.grad is not None and w32.grad is None
    x32, w32 = x.detach().float(), w.detach().float().requires_grad_()
    rms_norm_op(x32, w32, 1e-5).sum().backward()
    assert w32.grad is not None


def test_cpu_op_dispatch_and_bad_input(rng):
    x, w = torch.randn(3, 8, generator=rng), torch.randn(8, generator=rng)
    torch.testing.assert_close(rms_norm_op(x, w, 1e-6, backend="cpu"),
                               rms_norm_op(x, w, 1e-6, backend="torch"))
    assert rms_norm_op(x, w, 1e-6, backend="torch").grad_fn is None  # no grad asked
    with pytest.raises(BackendUnavailable, match="takes float32 tensors"):
        rms_norm_op(x.bfloat16(), w.bfloat16(), 1e-6, backend="cpu")
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm_op(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="backend"):
        rms_norm_op(x, w, 1e-6, backend="cuda")
    with pytest.raises(RuntimeError, match="grad_y must be float32"):
        ext.rms_norm_backward_cpu(torch.randn(3, 7), x, w, 1e-6)


@pytest.mark.parametrize("x,w,match", [
    (torch.randn(2, 4).double(), torch.randn(4).double(), "float32 only"),
    (torch.randn(2, 4), torch.randn(5), r"x \[\.\.\., H\] and weight \[H\]"),
    (torch.randn(2, 4), torch.randn(1, 4), r"x \[\.\.\., H\] and weight \[H\]"),
])
def test_bad_input(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        ext.rms_norm_cpu(x, w, 1e-6)
