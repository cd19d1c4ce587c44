"""bench_e2e.py once on a small setting (both paths, the table): `pytest benchmarks/`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402


def test_e2e_table(tmp_path, capsys):
    out = tmp_path / "e2e.md"
    bench_e2e.main(["--iterations", "2", "--batch", "8", "--new-tokens", "8", "--out", str(out)])
    text = out.read_text()
    assert "HF generate + torch losses" in text and "ours (rlhf_kernels)" in text
    assert "fused:llama" in text and "fallback" in text
