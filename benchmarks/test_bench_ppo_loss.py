"""pytest-benchmark cases of bench_ppo_loss.py: `pytest benchmarks/ --benchmark-only`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo_loss import (CPU_LINEAR, CPU_SHAPES, GPU_LINEAR, GPU_SHAPES, impls_for,  # noqa: E402
                            inputs, loss_fn)
from common import sync  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = GPU_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES[:1]
LINEAR = GPU_LINEAR if DEVICE.type == "cuda" else CPU_LINEAR


def _bench(benchmark, impl, shape, linear):
    first, rest = inputs(shape, DTYPE, DEVICE, linear)
    f = loss_fn(impl, linear)

    def step():
        for x in first:
            x.grad = None
        f(first, rest).backward()
        sync(DEVICE)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", impls_for(DEVICE))
def test_ppo_actor_loss_fwd_bwd(benchmark, impl, shape):
    benchmark.group = f"ppo_actor_loss fwd+bwd {'x'.join(map(str, shape))} {DEVICE.type}"
    _bench(benchmark, impl, shape, False)


@pytest.mark.parametrize("shape", LINEAR, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", impls_for(DEVICE))
def test_lm_head_ppo_loss_fwd_bwd(benchmark, impl, shape):
    benchmark.group = f"lm head + ppo loss fwd+bwd {'x'.join(map(str, shape))} {DEVICE.type}"
    _bench(benchmark, impl, shape, True)
