"""pytest-benchmark cases of bench_layer_ops.py: `pytest benchmarks/ --benchmark-only`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layer_ops import MODELS, cases  # noqa: E402

pytest.importorskip("rlhf_kernels._C", reason="the CPU kernels need the built extension")


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m[0].replace(" ", "-"))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("op", ["RMSNorm", "RoPE (q and k)", "SwiGLU"])
def test_layer_op(benchmark, op, backend, model, grad):
    label, *shape = model
    benchmark.group = f"{op} {label} {'fwd+bwd' if grad else 'fwd'} cpu"
    with torch.set_grad_enabled(grad):
        fn = {name: f for name, f, _ in cases(*shape, grad)}[op]
        benchmark(lambda: fn(backend))
