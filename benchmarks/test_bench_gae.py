"""pytest-benchmark cases of bench_gae.py: `pytest benchmarks/ --benchmark-only`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rlhf_kernels  # noqa: E402
from bench_gae import BASELINES, SHAPES, backends_for, make_inputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["zero", "skip"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["loop"] + backends_for(DEVICE))
def test_gae(benchmark, impl, shape, mode):
    r, v, m = make_inputs(*shape, DEVICE)
    benchmark.group = f"gae {mode} {shape[0]}x{shape[1]} {DEVICE.type}"
    if impl in ("loop", "torch"):
        mf = m.float()
        fn = ((lambda: BASELINES[mode][1](r, v, mf)) if impl == "loop" else
              (lambda: rlhf_kernels.gae(r, v, m, mode=mode, backend="torch")))
        benchmark.pedantic(lambda: (fn(), _sync()), rounds=3, warmup_rounds=1)
    else:
        benchmark(lambda: (rlhf_kernels.gae(r, v, m, mode=mode, backend=impl), _sync()))
