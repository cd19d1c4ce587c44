"""bench_trl.py once on a small setting (one step per configuration, the tables):
`pytest benchmarks/`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_trl  # noqa: E402
from report import tables  # noqa: E402


def test_trl_grpo_table(tmp_path):
    out = tmp_path / "trl_grpo.md"
    bench_trl.main(["--models", "tiny-llama", "--steps", "1", "--warmup", "0", "--batch", "4",
                    "--generations", "2", "--completion-tokens", "8", "--out", str(out)])
    timing, agreement = tables(out.read_text())
    assert [row["config"] for row in timing] == list(bench_trl.CONFIGS)
    assert all(row["steps"] == "1" and float(row["step s"]) > 0 for row in timing)
    # the same batch and weights: fp32 rounding apart (the tolerances of tests/)
    for row in agreement:
        assert float(row["loss gap"]) <= 1e-5 and float(row["log-prob gap"]) <= 1e-4
        assert float(row["gradient gap"]) <= 2e-5
