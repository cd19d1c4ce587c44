"""pytest-benchmark cases of bench_generation.py: `pytest benchmarks/ --benchmark-only`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generation import IMPLS, build, runner  # noqa: E402
from common import sync  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@pytest.fixture(scope="module")
def tiny_llama():
    return build("tiny-llama", DTYPE, DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_tiny_llama_batch8(benchmark, impl, tiny_llama):
    model, config = tiny_llama
    benchmark.group = f"generate tiny-llama b8 16+32 {DEVICE.type}"
    ids = torch.randint(3, model.config.vocab_size, (8, 16), device=DEVICE)
    fn = runner(impl, model, config, ids, 32)

    def step():
        fn()
        sync(DEVICE)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
