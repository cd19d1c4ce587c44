"""`make bench`: run every benchmark, then write one report with its tables and PNG plots.

    python benchmarks/report.py [--only-assemble]   ->  benchmarks/results/REPORT_<device>.md

Each benchmark writes its own table (results/<name>_<device>.md: device, date, versions, the
command); the report gathers them and plots baseline vs ours from the tables themselves.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CPU_ONLY = {"layer_ops"}  # GPUs run torch's kernels for these
BENCHES = {  # name -> (script, extra arguments on CPU, title)
    "gae": ("bench_gae.py", [], "GAE"),
    "ppo_loss": ("bench_ppo_loss.py", [], "PPO actor loss (log-probs, entropy, KL, clip)"),
    "generation": ("bench_generation.py", [], "KV-cache generation"),
    "layer_ops": ("bench_layer_ops.py", [], "Decoder-layer ops on the CPU (RMSNorm, RoPE, SwiGLU)"),
    "e2e": ("bench_e2e.py", [], "End-to-end PPO step"),
    "trl_grpo": ("bench_trl.py", [], "TRL GRPOTrainer step, drop-in"),
}


def tables(markdown: str) -> list[list[dict]]:
    """Every markdown table of a text as a list of {header: cell} rows."""
    found, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def number(text: str) -> float:
    return float(text.rstrip("x%").replace(",", "")) if text else float("nan")


def bars(path, title, labels, series: dict[str, list[float]], ylabel, log=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 3.6))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels,
                  rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(name: str, markdown: str, out: Path) -> Path | None:
    found = tables(markdown)
    if not found:
        return None
    rows, path = found[0], out / f"{name}.png"
    if name == "gae":
        base = {(r["B x T"], r["mode"]): number(r["ms (median)"]) for r in rows
                if r["implementation"].startswith("loop")}
        ours = [r for r in rows if r["implementation"] in ("cpu", "cuda")]
        labels = [f"{r['B x T']} {r['mode']}" for r in ours]
        bars(path, "GAE (ms, log scale)", labels, {
            "Python loop": [base[(r["B x T"], r["mode"])] for r in ours],
            "ours": [number(r["ms (median)"]) for r in ours]}, "ms", log=True)
    elif name == "ppo_loss":
        base = {r["B x T x V"]: r for r in rows if r["impl"] == "baseline"}
        ours = [r for r in rows if r["impl"] != "baseline"]
        labels = [r["B x T x V"] for r in ours]
        bars(path, "PPO actor loss fwd+bwd (ms)", labels, {
            "log_softmax + gather (fp32)": [number(base[r["B x T x V"]]["fwd+bwd ms"]) for r in ours],
            "ours": [number(r["fwd+bwd ms"]) for r in ours]}, "ms")
    elif name == "generation":
        labels = [f"{r['model']} b{r['batch']}" for r in rows]
        bars(path, "Generation throughput (tokens/s)", labels, {
            "HF generate": [number(r["HF tok/s"]) for r in rows],
            "HF static cache": [number(r["HF static tok/s"]) for r in rows],
            "ours": [number(r["ours tok/s"]) for r in rows]}, "tokens/s", log=True)
    elif name == "layer_ops":
        labels = [f"{r['shape']}: {r['op']} {r['pass']}" for r in rows]
        bars(path, "Decoder-layer ops on the CPU (us, log scale)", labels, {
            "torch (HF's ATen chains)": [number(r["torch us"]) for r in rows],
            "ours": [number(r["ours us"]) for r in rows]}, "us", log=True)
    elif name == "e2e":
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 1.0 + 0.32 * len(rows)))
        for y, r in enumerate(rows):
            left = 0.0
            for phase, color in (("generation s", "C0"), ("experience s", "C1"),
                                 ("training s", "C2")):
                width = number(r[phase])
                ax.barh(y, width, left=left, color=color, label=phase if y == 0 else None)
                left += width
        ax.set_yticks(range(len(rows)), [f"{r['path']} ({r['new tokens']} tokens)" for r in rows],
                      fontsize=8)
        ax.set_xlabel("seconds per PPO step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    else:  # a table with no plot (trl_grpo: its ratios are the result)
        return None
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only-assemble", action="store_true", help="reuse the existing tables")
    p.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    plots = RESULTS / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections = [f"# Benchmark report ({device})\n\nEach section is the table a benchmark "
                f"script wrote (device, date, versions and the command are in it).\n"]
    for name, (script, extra, title) in BENCHES.items():
        if name in CPU_ONLY and device != "cpu":
            continue
        table = RESULTS / f"{name}_{device}.md"
        if not args.only_assemble and name not in skip:
            # paths relative to the checkout: the tables quote the command
            subprocess.run([sys.executable, str((HERE / script).relative_to(HERE.parent)),
                            "--out", str(table.relative_to(HERE.parent)), *extra],
                           check=True, cwd=HERE.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not table.exists():
            sections.append(f"## {title}\n\n(not run: {table.name} missing)\n")
            continue
        text = table.read_text()
        figure = plot(name, text, plots)
        body = text.split("\n", 1)[1]  # drop the table's own H1
        image = f"\n![{title}](plots/{figure.name})\n" if figure else ""
        sections.append(f"## {title}\n{body}{image}")
    report = RESULTS / f"REPORT_{device}.md"
    report.write_text("\n".join(sections))
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
