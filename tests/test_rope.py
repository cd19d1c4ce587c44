"""The RoPE kernel (csrc/cpu/rope.cpp) and its op (rlhf_kernels.ops.rope) against float64 and
the torch reference, forward and backward, in both instruction-set builds (make test runs this
file again with RLHF_KERNELS_CPU_BASELINE=1)."""
import pytest
import torch

from rlhf_kernels import BackendUnavailable
from rlhf_kernels.ops.rope import rotate
from rlhf_kernels.reference.rope import rope_tables
from rlhf_kernels.reference.rope import rotate as reference

ext = pytest.importorskip("rlhf_kernels._C")

# (B, T, H, D): one token, heads not a power of two, half-dims of 1, 3, 12 (vector tails), 32
SHAPES = [(1, 1, 1, 2), (1, 7, 3, 6), (3, 5, 2, 24), (2, 3, 4, 32), (4, 30, 4, 64)]


def tables(shape, rng, dtype=torch.float32):
    """HF-style tables for random positions (left padding gives any position to any row)."""
    batch, length, _, dim = shape
    positions = torch.randint(0, 500, (batch, length), generator=rng).to(dtype)
    inv_freq = 10000.0 ** -(torch.arange(0, dim, 2, dtype=dtype) / dim)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return rope_tables(emb.cos(), emb.sin())


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_matches_float64_and_the_reference(rng, shape):
    x = torch.randn(*shape, generator=rng)
    cos, sin = tables(shape, rng)
    y = rotate(x, cos, sin)
    assert y.shape == x.shape and y.grad_fn is None
    # two products and an add per element, |cos|, |sin| <= 1: torch rounds three times, the
    # x86-64-v3 build twice (a fused multiply-add), both within 2 ulps of max |x| of float64
    want = reference(x.double(), cos.double(), sin.double())
    ulps2 = 4 * 2.0 ** -24 * x.abs().max().item()
    torch.testing.assert_close(y.double(), want, atol=ulps2, rtol=0)
    torch.testing.assert_close(reference(x, cos, sin).double(), want, atol=ulps2, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_gradient_is_the_inverse_rotation(rng, shape):
    """d/dx of sum(dy * rope(x)) against float64 autograd of the reference: one product pair
    and an add per element, a few ulps of |dy|."""
    x = torch.randn(*shape, generator=rng, requires_grad=True)
    cos, sin = tables(shape, rng)
    dy = torch.randn(*shape, generator=rng)
    y = rotate(x, cos, sin)
    assert type(y.grad_fn).__name__ == "GeneratedBackwardFor_rlhf_kernels_rope_defaultBackward"
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference(x64, cos.double(), sin.double()), x64, dy.double())
    torch.testing.assert_close(dx.double(), want, atol=4 * 2.0 ** -24 * dy.abs().max().item(),
                               rtol=0)


def test_cpu_gradcheck_and_constant_tables(rng):
    """float64 runs the reference (the kernel is float32 only): gradcheck checks the map;
    tables that require grad also take the reference, which differentiates them."""
    shape = (2, 3, 2, 8)
    cos, sin = tables(shape, rng, torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: rotate(a, cos, sin), (x,))
    cos32 = cos.float().requires_grad_()
    y = rotate(x.detach().float(), cos32, sin.float())
    y.sum().backward()
    assert cos32.grad is not None


def test_cpu_bad_input(rng):
    x = torch.randn(2, 3, 4, 8, generator=rng)
    cos, sin = tables(x.shape, rng)
    with pytest.raises(ValueError, match=r"tables \[B, T, 1, D\]"):
        rotate(x, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="D even"):
        rotate(torch.randn(2, 3, 4, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="backend"):
        rotate(x, cos, sin, backend="triton")
    with pytest.raises(BackendUnavailable, match="takes float32 tensors"):
        rotate(x.bfloat16(), cos.bfloat16(), sin.bfloat16(), backend="cpu")
    assert torch.equal(rotate(x, cos, sin, backend="torch"), reference(x, cos, sin))
    with pytest.raises(RuntimeError, match="float32 only"):
        ext.rope_cpu(x.reshape(6, 4, 8).double(), cos.reshape(6, 8), sin.reshape(6, 8))
    with pytest.raises(RuntimeError, match=r"\[N, D\]"):
        ext.rope_cpu(x.reshape(6, 4, 8), cos.reshape(6, 8)[:5], sin.reshape(6, 8)[:5])
