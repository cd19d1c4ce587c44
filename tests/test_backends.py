"""Dispatch: fallbacks with one warning, clear errors for backends that cannot run, the report."""
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _backends


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_import_without_extension_falls_back_with_one_warning():
    # sys.modules[name] = None makes `import rlhf_kernels._C` raise ImportError
    proc = _run("""
        import sys, warnings
        sys.modules["rlhf_kernels._C"] = None
        import torch, rlhf_kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = torch.randn(2, 5)
            for _ in range(3):
                adv, ret = rlhf_kernels.gae(r, r)
        ref, _ = rlhf_kernels.gae(r, r, backend="torch")
        assert torch.equal(adv, ref)
        msgs = [str(w.message) for w in caught if "falls back" in str(w.message)]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        try:
            rlhf_kernels.gae(r, r, backend="cpu")
        except rlhf_kernels.BackendUnavailable as e:
            print("explicit:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "falls back from the cpu backend" in proc.stdout
    assert "explicit: gae: backend 'cpu' is not available" in proc.stdout
    assert "pip install -e ." in proc.stdout


def test_unknown_backend_and_device_mismatch():
    r = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlhf_kernels.gae(r, r, backend="tpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        rlhf_kernels.gae(r, r, backend="cuda")


@pytest.mark.skipif(_backends.triton_interpret() or torch.cuda.is_available(),
                    reason="checks the error without a GPU and without the Triton interpreter")
def test_triton_on_cpu_tensors_needs_interpreter():
    r = torch.randn(2, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rlhf_kernels.gae(r, r, backend="triton")


@pytest.mark.skipif(_backends.kernel_status("gae", "cuda")[0],
                    reason="the extension here has CUDA kernels")
def test_missing_cuda_kernel_is_reported():
    ok, why = _backends.kernel_status("gae", "cuda")
    assert not ok and "RLHF_KERNELS_CUDA=1" in why


def test_report_lists_ops_backends_and_flags():
    proc = subprocess.run([sys.executable, "-m", "rlhf_kernels", "report"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "extension rlhf_kernels._C: built" in out
    assert "cxx_flags" in out and "-O3" in out
    row = next(line for line in out.splitlines() if line.startswith("gae "))
    cells = [c.rstrip("*") for c in row.replace("not built", "not-built").split()[1:]]
    assert cells == ["available" if _backends.kernel_status("gae", b)[0] else "not-built"
                     for b in _backends.BACKENDS]
