"""`python -m rlhf_kernels selftest`: passes here, covers every op x available backend, reports
a wrong or raising kernel as a failed row (exit status 1), and uses the tests' own bounds."""
import json
import math

import numpy as np
import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _backends, selftest
from rlhf_kernels import selftest_tolerances as tol
from rlhf_kernels.__main__ import main
from rlhf_kernels._backends import triton_interpret
from rlhf_kernels.ops import OPS
from rlhf_kernels.selftest_cases import compare


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(capsys, *args):
    rc = main(["selftest", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_selftest_cpu_passes_with_every_available_row(capsys, tmp_path):
    path = tmp_path / "rows.json"
    rc, out, _ = run_cli(capsys, "--device", "cpu", "--json", str(path))
    assert rc == 0, out
    rows = json.loads(path.read_text())["rows"]
    assert all(r["ok"] for r in rows)
    seen = {(r["op"], r["backend"], r["dtype"]) for r in rows}
    built = _backends.extension()[0] is not None
    for op, case in selftest.CASES.items():
        kernels = OPS[case.kernels] if case.kernels else ()
        expected = ["torch"] + (["cpu"] if built and "cpu" in kernels else []) + (
            ["triton"] if triton_interpret() and "triton" in kernels else [])
        for backend in expected:  # torch always, the C++ kernels when built, Triton if asked
            for dtype in case.dtypes:
                assert (op, backend, str(dtype).replace("torch.", "")) in seen
    assert not any(r["backend"] == "cuda" for r in rows)  # CPU tensors only
    assert f"{len(rows)}/{len(rows)} passed, 0 failed" in out


def test_every_op_has_a_case():
    assert set(OPS) <= set(selftest.CASES)


def test_an_op_without_a_case_is_a_failed_row(monkeypatch):
    monkeypatch.setitem(OPS, "new_op", ("torch",))
    rows, _ = selftest.run("cpu", ops=None)
    row = next(r for r in rows if r.op == "new_op")
    assert not row.ok and "no selftest case" in row.note


def test_a_slightly_wrong_kernel_fails_its_rows_only(capsys, monkeypatch, tmp_path):
    real = rlhf_kernels.logprobs

    def off_by_a_little(*args, backend="auto", **kwargs):
        logp, ent = real(*args, backend=backend, **kwargs)
        return (logp * (1 + 1e-3), ent) if backend == "cpu" else (logp, ent)  # 0.1% off

    monkeypatch.setattr(rlhf_kernels, "logprobs", off_by_a_little)
    path = tmp_path / "rows.json"
    rc, out, _ = run_cli(capsys, "--device", "cpu", "--ops", "logprobs,gae", "--json", str(path))
    assert rc == 1
    rows = json.loads(path.read_text())["rows"]
    failed = {(r["op"], r["backend"]) for r in rows if not r["ok"]}
    assert failed == {("logprobs", "cpu")}, out
    assert "FAILED: logprobs" in out and "FAIL" in out


def test_a_raising_kernel_is_a_failed_row_and_the_run_goes_on(monkeypatch):
    real = rlhf_kernels.gae

    def broken(*args, backend="auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("kernel exploded\nsecond line")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(rlhf_kernels, "gae", broken)
    rows, _ = selftest.run("cpu", ops=["gae", "swiglu"])
    bad = [r for r in rows if not r.ok]
    assert bad and all(r.op == "gae" and r.backend == "torch" for r in bad)
    assert bad[0].note == "RuntimeError: kernel exploded" and bad[0].max_error is None
    assert any(r.op == "swiglu" and r.ok for r in rows)


@pytest.mark.triton
@pytest.mark.skipif(not (triton_interpret() or torch.cuda.is_available()),
                    reason="Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on CPU")
def test_selftest_runs_the_triton_rows():
    if not selftest.backend_status("gae", "triton", torch.device(DEVICE))[0]:
        pytest.skip("triton is not available here")
    rows, _ = selftest.run(DEVICE, ops=["gae", "logprobs"])
    triton = [r for r in rows if r.backend == "triton"]
    assert len(triton) == 6 and all(r.ok for r in triton), [r.note for r in triton]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_selftest_cuda_passes(capsys):
    rc, out, _ = run_cli(capsys, "--device", "cuda")
    assert rc == 0, out
    assert " cuda " in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_device_cuda_without_cuda_is_one_clear_line(capsys):
    rc, out, err = run_cli(capsys, "--device", "cuda")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "--device cuda needs a CUDA device" in err


def test_unknown_op_is_one_clear_line(capsys):
    rc, _, err = run_cli(capsys, "--device", "cpu", "--ops", "logprobs,nope")
    assert rc == 2 and "unknown op(s) ['nope']" in err


def test_report_points_to_selftest(capsys):
    assert main(["report"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "python -m rlhf_kernels selftest" in last


def test_compare_takes_the_worst_element_relative_to_its_bound():
    got = torch.tensor([1.0, 2.0, float("inf"), 4.0])
    want = torch.tensor([1.5, 2.0, float("inf"), 4.1], dtype=torch.float64)
    check = compare("x", got, want, torch.tensor([10.0, 1.0, 1.0, 0.01], dtype=torch.float64))
    assert check.error == pytest.approx(0.1) and check.tolerance == 0.01 and not check.ok
    assert compare("x", got, want, 1.0).ok
    assert not compare("x", torch.tensor([float("nan")]), torch.tensor([0.0]), 1.0).ok
    assert not compare("x", torch.zeros(2), torch.zeros(3), 1.0).ok


# The bounds are the tests' own: each against the helper the tests call, on random inputs.

def test_bounds_match_the_logprobs_tests(rng):
    from logprobs_oracle import DTYPE_ULP, fwd_tolerance, grad_tolerance
    x = torch.randn(2, 3, 77, generator=rng) * 3
    x[0, 0, ::2] = float("-inf")
    assert tol.logprobs_fwd(x, 0.7) == fwd_tolerance(x, 0.7, 77)
    grad = torch.randn(2, 3, 77, generator=rng)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for truncating in (False, True):
            assert tol.logprobs_grad(grad, 1e-5, dtype, truncating) == grad_tolerance(
                grad, 1e-5, dtype, truncating)
    assert tol.DTYPE_ULP == DTYPE_ULP


def test_bounds_match_the_gae_tests(rng):
    from gae_oracle import error_bound
    r, v = torch.randn(3, 40, generator=rng), torch.randn(3, 40, generator=rng)
    m = torch.rand(3, 40, generator=rng) > 0.3
    adv = np.random.default_rng(0).standard_normal((3, 40))
    for gamma, lam in ((1.0, 0.95), (0.9, 0.0), (1.0, 1.0)):
        for scan in (False, True):
            depth = math.ceil(math.log2(40)) if scan else 1
            assert tol.gae(r, v, m, torch.from_numpy(adv), gamma, lam, scan) == pytest.approx(
                error_bound(r, v, m, adv, gamma, lam, depth), rel=1e-12)


def test_bounds_match_the_fused_linear_decode_and_layer_tests(rng):
    from test_decode import ULP
    from test_fused_linear import tolerance
    from test_swiglu import ULPS
    h, w = torch.randn(1, 10, 16, generator=rng), torch.randn(300, 16, generator=rng) / 4
    assert tol.fused_linear(h, w) == tolerance(h, w, 300)
    assert all(tol.DTYPE_ULP[d] == u for d, u in ULP.items())
    assert tol.SWIGLU_ULPS == ULPS
