import os

import pytest
import torch

import rlhf_kernels._backends as backends


def backend_params(op: str):
    """One pytest param per backend of `op`, skipped with the reason when it cannot run here."""
    params = []
    for name in backends.BACKENDS:
        ok, why = backends.kernel_status(op, name)
        marks = []
        if name == "cuda":
            marks.append(pytest.mark.gpu)
            if not torch.cuda.is_available():
                ok, why = False, "needs a CUDA device (none here)"
        if name == "triton":
            marks.append(pytest.mark.triton)
            if ok and not torch.cuda.is_available() and not backends.triton_interpret():
                ok, why = False, "no CUDA device and TRITON_INTERPRET is not 1"
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{name} backend: {why}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def device_for(backend: str) -> torch.device:
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# kernel-level test files: Triton launchers called directly, or the CUDA entry points of _C
TRITON_KERNEL_MARKS = [pytest.mark.triton, pytest.mark.skipif(
    not (backends.triton_interpret() or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors")]
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available()
                             and not backends.triton_interpret() else "cpu")
CUDA_KERNEL_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device")]


def cuda_extension(entry_point: str):
    """rlhf_kernels._C, or a skip when it was built without `entry_point`."""
    ext = pytest.importorskip("rlhf_kernels._C")
    if not hasattr(ext, entry_point):
        pytest.skip("rlhf_kernels._C was built without the CUDA kernels")
    return ext


@pytest.fixture
def rng():
    """A fresh generator per test: inputs are random, the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
