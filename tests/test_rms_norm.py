"""The decode loop's RMSNorm kernel (csrc/cpu/rms_norm.cpp) against float64, in both of its
instruction-set builds (make test runs this file again with RLHF_KERNELS_CPU_BASELINE=1)."""
import pytest
import torch

from rlhf_kernels.generation.adapters.base import fused_rms_norm, rms_norm

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


@pytest.mark.parametrize("x,w,match", [
    (torch.randn(2, 4).double(), torch.randn(4).double(), "float32 only"),
    (torch.randn(2, 4), torch.randn(5), r"x \[\.\.\., H\] and weight \[H\]"),
    (torch.randn(2, 4), torch.randn(1, 4), r"x \[\.\.\., H\] and weight \[H\]"),
])
def test_bad_input(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        ext.rms_norm_cpu(x, w, 1e-6)
