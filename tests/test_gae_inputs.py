"""GAE bad input: each error is a ValueError / TypeError that names the argument."""
import pytest
import torch

import rlhf_kernels


def call(r=None, v=None, m=None, **kw):
    r = torch.randn(2, 5) if r is None else r
    v = torch.randn(*r.shape) if v is None else v
    return rlhf_kernels.gae(r, v, m, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(v=torch.randn(2, 6)), ValueError, "values must have the shape"),
    (dict(r=torch.randn(2, 3, 4)), ValueError, "rewards must be 2-D"),
    (dict(r=torch.randn(10)), ValueError, "rewards must be 2-D"),
    (dict(m=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(m=torch.full((2, 5), 2)), ValueError, "mask must hold only 0 and 1"),
    (dict(r=torch.ones(2, 5, dtype=torch.int64)), TypeError, "rewards must be a floating"),
    (dict(v=torch.ones(2, 5, dtype=torch.int32)), TypeError, "values must be a floating"),
    (dict(r=[[1.0, 2.0]], v=torch.randn(1, 2)), TypeError, "rewards must be a torch.Tensor"),
    (dict(r=torch.zeros(0, 5)), ValueError, "rewards is empty"),
    (dict(gamma=1.5), ValueError, "gamma must be in"),
    (dict(lam=-0.1), ValueError, "lam must be in"),
    (dict(mode="average"), ValueError, "mode must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("which", ["rewards", "values"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_at_valid_position(backend, which, bad):
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    (r if which == "rewards" else v)[1, 2] = bad
    with pytest.raises(ValueError, match=f"{which} holds a non-finite"):
        rlhf_kernels.gae(r, v, backend=backend)
    # the same value under mask = 0 is padding, never read
    m = torch.ones(3, 6, dtype=torch.bool)
    m[1, 2] = False
    adv, ret = rlhf_kernels.gae(r, v, m, backend=backend)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 5, 3, 10], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([0, 4, 9], dtype=torch.int32), "end at the packed length 10"),
    (torch.tensor([1, 4, 10], dtype=torch.int32), "start at 0"),
    (torch.tensor([0, 10.0]), "cu_seqlens must be int32"),
    (torch.tensor([[0, 10]], dtype=torch.int32), "cu_seqlens must be 1-D"),
])
def test_bad_cu_seqlens(cu, match):
    r = torch.randn(10)
    with pytest.raises((ValueError, TypeError), match=match):
        rlhf_kernels.gae(r, r, cu_seqlens=cu)


def test_packed_input_must_be_1d():
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        rlhf_kernels.gae(torch.randn(2, 5), torch.randn(2, 5),
                         cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32))


def test_mixed_float_dtypes_are_accepted():
    r = torch.randn(2, 5)
    adv, _ = rlhf_kernels.gae(r.half(), r.double())
    assert adv.dtype == torch.float32
