"""tools/gpu_check.sh, the one-shot device check, in its dry mode on the CPU: every step a CPU can
run (setup.py offline, report, selftest --device cpu, a few tests, each GPU benchmark at smoke
sizes), with pip pointed at no index and the hub offline. A device machine has no network and
no second chance, so the script is run here on every test pass: it cannot rot unseen.
The compile itself is skipped (GPU_CHECK_SKIP_BUILD=1: minutes on two cores; make check-cuda
and the editable install compile the same sources).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ["environment", "build", "report", "selftest", "pytest", "bench_gae", "bench_ppo_loss",
         "bench_generation"]
TABLES = ["bench_gae.md", "bench_ppo_loss.md", "bench_generation.md", "pytest.xml"]

pytestmark = pytest.mark.slow


def run_script(out, *args, budget=900, timeout=1500):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SKIP_BUILD": "1",
           "GPU_CHECK_BUDGET": str(budget)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it where it wants the interpreter
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def summary_rows(out):
    lines = (out / "summary.md").read_text().splitlines()[2:]
    return {cells[0]: cells[1] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_dry_run_runs_every_step_offline(tmp_path):
    proc = run_script(tmp_path, "--dry")
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report
    rows = summary_rows(tmp_path)
    assert list(rows) == STEPS, report
    has_selftest = importlib.util.find_spec("rlhf_kernels.selftest") is not None
    for name, status in rows.items():
        if name == "build":
            assert status.startswith("skipped (build: compile skipped"), status
        elif name == "selftest" and not has_selftest:
            assert status.startswith("skipped (selftest:"), status
        else:
            assert status == "ok", f"{name}: {status}\n{report}"
        assert (tmp_path / f"{name}.log").stat().st_size > 0
    for name in TABLES + (["selftest.json"] if has_selftest else []):
        assert (tmp_path / name).stat().st_size > 0, name
    environment = (tmp_path / "environment.log").read_text()
    assert "PIP_NO_INDEX=1" in environment and "HF_HUB_OFFLINE=1" in environment
    assert "passed" in (tmp_path / "pytest.log").read_text()


def test_spent_budget_skips_the_steps_and_says_so(tmp_path):
    proc = run_script(tmp_path, "--dry", budget=0, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # steps not reached: a failure
    rows = summary_rows(tmp_path)
    assert list(rows) == STEPS
    assert set(rows.values()) == {"skipped (budget spent)"}
    assert "budget" in (tmp_path / "pytest.log").read_text()


def test_usage_error_without_outdir():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
