"""The decode-step projection kernel (csrc/cpu/skinny_linear.cpp) against float64."""
import pytest
import torch

ext = pytest.importorskip("rlhf_kernels._C")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 13), (17, 9), (64, 256), (576, 1536), (1000, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(rng, rows, n, k, with_bias):
    x = torch.randn(rows, k, generator=rng)
    w = torch.randn(n, k, generator=rng)
    bias = torch.randn(n, generator=rng) if with_bias else None
    y = ext.skinny_linear_cpu(x, w, bias)
    expected = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    # fp32 sum of k products of N(0,1) terms: error ~ k * eps * |terms|; 4 sigma of |x w| ~ 16
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=16 * k * 2.0 ** -24 * 4)
    assert y.dtype == torch.float32 and y.shape == (rows, n)


def test_reads_strided_x_and_gives_a_fresh_output(rng):
    x = torch.randn(4, 2 * 40, generator=rng)[:, ::2]   # a non-contiguous view
    w = torch.randn(24, 40, generator=rng)
    torch.testing.assert_close(ext.skinny_linear_cpu(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,w,match", [
    (torch.randn(9, 4), torch.randn(3, 4), "1 to 8 rows"),
    (torch.randn(0, 4), torch.randn(3, 4), "1 to 8 rows"),
    (torch.randn(2, 4).double(), torch.randn(3, 4).double(), "float32 only"),
    (torch.randn(2, 4), torch.randn(3, 5), r"x \[M, K\] and w \[N, K\]"),
])
def test_bad_input(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        ext.skinny_linear_cpu(x, w)
