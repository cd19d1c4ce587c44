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


CUDA = torch.device("cuda")  # a device object needs no GPU: choose() only reads its type


@pytest.fixture
def everything_built(monkeypatch):
    """Every kernel of the table reported as built (as on a CUDA machine with the extension)."""
    monkeypatch.setattr(_backends, "kernel_status", lambda op, backend: (True, None))
    monkeypatch.setattr(_backends, "kernel", lambda op, backend: ())


@pytest.mark.parametrize("op", ["gae", "logprobs", "decode_attention", "sample"])
def test_auto_on_cuda_takes_the_cuda_kernel_and_float64_the_reference(everything_built, op):
    assert _backends.choose(op, "auto", CUDA, torch.float32) == "cuda"
    want = "cuda" if op in ("gae", "logprobs") else "torch"  # their CUDA kernels take float64
    assert _backends.choose(op, "auto", CUDA, torch.float64) == want


def test_auto_decode_head_dims_and_cpu(everything_built):
    assert _backends.choose("decode_attention", "auto", CUDA, torch.bfloat16, 128) == "cuda"
    assert _backends.choose("decode_attention", "auto", CUDA, torch.bfloat16, 40) == "triton"
    assert _backends.choose("logprobs", "auto", torch.device("cpu"), torch.float64) == "cpu"
    assert _backends.choose("rms_norm", "auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert _backends.choose("rms_norm", "auto", CUDA, torch.float32) == "torch"
    assert _backends.choose("rope", "auto", torch.device("cpu"),
                            (torch.float32, torch.float16)) == "torch"


def test_explicit_backend_that_cannot_serve_raises(everything_built):
    with pytest.raises(_backends.BackendUnavailable, match="head dims"):
        _backends.choose("decode_attention", "cuda", CUDA, torch.float16, 40)
    with pytest.raises(_backends.BackendUnavailable, match="takes float16 / bfloat16 / float32"):
        _backends.choose("sample", "triton", CUDA, torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.choose("rms_norm", "cuda", CUDA, torch.float32)


def test_ops_table_lists_the_public_ops():
    assert set(rlhf_kernels.ops.OPS) == {"gae", "logprobs", "decode_attention", "sample",
                                         "rms_norm", "rope", "swiglu"}
    for op, backends in rlhf_kernels.ops.OPS.items():
        assert backends == tuple(b for b in _backends.BACKENDS if b in _backends.TABLE[op])
