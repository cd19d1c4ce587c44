"""Every kernel op is a torch.library custom op (namespace rlhf_kernels) whose schema, fake
(meta) implementation, registered autograd and declared mutations agree with what it does:
torch.library.opcheck on small random CPU inputs, on the C++ kernels and the torch reference."""
import importlib
import math

import pytest
import torch
from torch._library.custom_ops import CustomOpDef

from rlhf_kernels import _backends

# the modules (rlhf_kernels.ops re-exports functions of the same names as gae and logprobs)
decode, fused_linear, gae, logprobs, rms_norm, rope, swiglu = (
    importlib.import_module(f"rlhf_kernels.ops.{name}")
    for name in ("decode", "fused_linear", "gae", "logprobs", "rms_norm", "rope", "swiglu"))

pytestmark = pytest.mark.skipif(not _backends.kernel_status("logprobs", "cpu")[0],
                                reason="needs the C++ extension (pip install -e .)")

BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16]


def _logits(rng, dtype, shape=(2, 3, 7)):
    return (torch.randn(shape, generator=rng) * 2).to(dtype).requires_grad_()


def logprobs_fwd_args(rng, dtype, backend):
    x = _logits(rng, dtype)
    y = torch.randint(0, 7, x.shape[:-1], generator=rng)
    return logprobs.logprobs_fwd, (x, y, 1 / 0.7, True, False, backend)


def logprobs_bwd_args(rng, dtype, backend):
    x = _logits(rng, dtype).detach()
    y = torch.randint(0, 7, x.shape[:-1], generator=rng)
    from rlhf_kernels.reference.logprobs import logprobs_fwd as ref_fwd
    _, ent, lse = ref_fwd(x, y, 1.0, True)
    g = torch.randn(ent.shape, generator=rng)
    return logprobs.logprobs_bwd, (x, y, lse, ent, g, g * 0.5, 1.0, backend, torch.empty_like(x))


def fused_linear_args(rng, dtype, backend):
    hidden = torch.randn(5, 4, generator=rng).to(dtype).requires_grad_()
    weight = torch.randn(9, 4, generator=rng).to(dtype).requires_grad_()
    y = torch.randint(0, 9, (5,), generator=rng)
    return fused_linear.fused_linear_logprobs_fwd, (hidden, weight, y, 1.0, 2, backend)


def fused_linear_bwd_args(rng, dtype, backend):
    _, (hidden, weight, y, *_) = fused_linear_args(rng, dtype, backend)
    hidden, weight = hidden.detach(), weight.detach()
    logp, ent, lse = fused_linear.fused_linear_logprobs_fwd(hidden, weight, y, 1.0, 2, backend)
    g = torch.randn(logp.shape, generator=rng)
    return fused_linear.fused_linear_logprobs_bwd, (hidden, weight, y, lse, ent, g, g * 0.5,
                                                    1.0, 2, backend)


def fused_ppo_args(rng, dtype, backend):
    op, (hidden, weight, y, *_) = fused_linear_args(rng, dtype, backend)
    old, adv, ref = (torch.randn(5, generator=rng) for _ in range(3))
    weights = torch.full((5,), 0.2)
    return fused_linear.fused_linear_ppo_loss, (
        hidden, weight, y, old - 2, adv, ref - 2, weights, 1.0, 2, backend, 0.2, 0.3, 3.0, 0.1,
        "k3", 0.01, 20.0)


def gae_args(rng, dtype, backend):
    r, v = (torch.randn(12, generator=rng).to(dtype) for _ in range(2))
    mask = torch.rand(12, generator=rng) > 0.3
    return gae.gae_op, (r, v, mask, None, 4, 0.99, 0.95, False, True, backend)


def gae_packed_args(rng, dtype, backend):
    op, (r, v, mask, *_) = gae_args(rng, dtype, backend)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    return op, (r, v, mask, cu, 0, 1.0, 0.9, True, False, backend)


def decode_args(rng, dtype, backend):
    q = torch.randn(2, 4, 8, generator=rng).to(dtype)
    k, v = (torch.randn(2, 2, 6, 8, generator=rng).to(dtype) for _ in range(2))
    k_new, v_new = (torch.randn(2, 2, 8, generator=rng).to(dtype) for _ in range(2))
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    start = torch.tensor([1, 0], dtype=torch.int32)
    return decode.decode_attention_op, (q, k, v, lengths, k_new, v_new, start,
                                        1 / math.sqrt(8), backend)


def sample_args(rng, dtype, backend):
    logits = torch.randn(3, 11, generator=rng).to(dtype)
    return decode.sample_op, (logits, 0.8, 5, 0.9, torch.rand(3, generator=rng), backend)


def rms_norm_args(rng, dtype, backend):
    x = torch.randn(3, 8, generator=rng, requires_grad=True)
    return rms_norm.rms_norm_op, (x, torch.randn(8, generator=rng, requires_grad=True), 1e-6,
                                  backend)


def rms_norm_backward_args(rng, dtype, backend):
    x, w = torch.randn(3, 8, generator=rng), torch.randn(8, generator=rng)
    return rms_norm.rms_norm_backward_op, (torch.randn(3, 8, generator=rng), x, w, 1e-6, backend)


def rope_args(rng, dtype, backend):
    x = torch.randn(2, 3, 2, 8, generator=rng, requires_grad=True)
    angle = torch.randn(2, 3, 1, 8, generator=rng)
    return rope.rope_op, (x, angle.cos(), angle.sin(), backend)


def swiglu_args(rng, dtype, backend):
    gate, up = (torch.randn(3, 10, generator=rng, requires_grad=True) for _ in range(2))
    return swiglu.swiglu_op, (gate, up, backend)


def swiglu_backward_args(rng, dtype, backend):
    g, gate, up = (torch.randn(3, 10, generator=rng) for _ in range(3))
    return swiglu.swiglu_backward_op, (g, gate, up, backend)


# (case, argument factory, dtypes, backends): the layer ops' kernels are float32 CPU only
CASES = [("logprobs_fwd", logprobs_fwd_args, DTYPES, BACKENDS),
         ("logprobs_bwd", logprobs_bwd_args, DTYPES, BACKENDS),
         ("fused_linear_logprobs", fused_linear_args, DTYPES, BACKENDS),
         ("fused_linear_logprobs_bwd", fused_linear_bwd_args, DTYPES, BACKENDS),
         ("fused_linear_ppo_loss", fused_ppo_args, DTYPES, BACKENDS),
         ("gae", gae_args, DTYPES, BACKENDS), ("gae_packed", gae_packed_args, DTYPES, BACKENDS),
         ("decode_attention", decode_args, DTYPES, BACKENDS),
         ("sample", sample_args, DTYPES, BACKENDS),
         ("rms_norm", rms_norm_args, [torch.float32], ["cpu"]),
         ("rms_norm_backward", rms_norm_backward_args, [torch.float32], ["cpu"]),
         ("rope", rope_args, [torch.float32], ["cpu"]),
         ("swiglu", swiglu_args, [torch.float32], ["cpu"]),
         ("swiglu_backward", swiglu_backward_args, [torch.float32], ["cpu"])]
PARAMS = [pytest.param(make, dtype, backend, id=f"{name}-{str(dtype)[6:]}-{backend}")
          for name, make, dtypes, backends in CASES for dtype in dtypes for backend in backends]


@pytest.mark.parametrize("make,dtype,backend", PARAMS)
def test_opcheck(rng, make, dtype, backend):
    op, args = make(rng, dtype, backend)
    torch.library.opcheck(op, args)


def test_every_custom_op_is_checked():
    modules = (decode, fused_linear, gae, logprobs, rms_norm, rope, swiglu)
    defined = {obj._qualname for m in modules for obj in vars(m).values()
               if isinstance(obj, CustomOpDef)}
    checked = {make(torch.Generator().manual_seed(0), torch.float32, "torch")[0]._qualname
               for _, make, _, _ in CASES}
    assert defined == checked
