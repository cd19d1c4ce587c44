"""A generator on another device than the logits (README: `generator=torch.Generator()` with a
CUDA model): the draws are made on the generator's device, then moved, never an error."""
import pytest
import torch

import rlhf_kernels
from rlhf_kernels.reference.sample import draw_uniforms


def test_draws_follow_the_generator_device_then_move():
    gen = torch.Generator().manual_seed(3)
    # the draws of a CPU generator for meta tensors are CPU draws, moved (on a GPU machine
    # test_cpu_generator_with_cuda_logits checks the case that used to raise)
    out = draw_uniforms(4, gen, torch.device("meta"))
    assert out.device.type == "meta" and out.shape == (4,)
    same = draw_uniforms(4, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(same, torch.rand(4, generator=torch.Generator().manual_seed(3)))


def test_same_seed_same_tokens_whatever_the_generator():
    logits = torch.randn(6, 37, generator=torch.Generator().manual_seed(0))
    a = rlhf_kernels.sample(logits, temperature=0.9, generator=torch.Generator().manual_seed(5))
    b = rlhf_kernels.sample(logits, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU test)")
def test_cpu_generator_with_cuda_logits():
    logits = torch.randn(6, 37, device="cuda")
    cpu = rlhf_kernels.sample(logits, temperature=0.9, generator=torch.Generator().manual_seed(5))
    again = rlhf_kernels.sample(logits, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert cpu[0].device.type == "cuda" and torch.equal(cpu[0], again[0])
