"""GAE: the Python reverse loop trainers run today vs rlhf_kernels.gae on every backend.

    python benchmarks/bench_gae.py [--device cpu|cuda] [--out benchmarks/results/gae_cpu.md]

Bytes moved per call (the floor): read rewards, values (input dtype) and the bool mask, write
advantages and returns (float32). GB/s is that over the median time; the ceiling is the
measured device copy bandwidth (read + write).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rlhf_kernels  # noqa: E402
from rlhf_kernels import _backends  # noqa: E402
from common import (copy_bandwidth, environment, markdown_table, median_time,  # noqa: E402
                    publish)
from gae_baselines import loop_gae_skip, loop_gae_zero  # noqa: E402

SHAPES = [(64, 512), (256, 1024), (1024, 2048), (8, 16384)]
BASELINES = {"zero": ("loop (DS-Chat/TRL/OpenRLHF)", loop_gae_zero),
             "skip": ("loop (veRL)", loop_gae_skip)}


def make_inputs(batch, length, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(batch, length, generator=g).to(device, dtype)
    v = torch.randn(batch, length, generator=g).to(device, dtype)
    # right padding: each response has its own length, as after generation
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    m = (torch.arange(length)[None, :] < lengths[:, None]).to(device)
    return r, v, m


def backends_for(device: torch.device):
    out = []
    for name in _backends.BACKENDS:
        if name == "cpu" and device.type != "cpu" or name == "cuda" and device.type != "cuda":
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a backend to time
        if _backends.kernel_status("gae", name)[0]:
            out.append(name)
    return out


def gae_bytes(r, m) -> int:
    return 2 * r.numel() * r.element_size() + m.numel() * m.element_size() + 2 * r.numel() * 4


def run(device: torch.device, shapes, modes, repeats: int, loop_repeats: int):
    ceiling = copy_bandwidth(device)
    rows = []
    for batch, length in shapes:
        r, v, m = make_inputs(batch, length, device)
        moved = gae_bytes(r, m)
        for mode in modes:
            label, loop = BASELINES[mode]
            mf = m.float()  # trainers hold the action mask as a float / long tensor
            t_loop = median_time(lambda: loop(r, v, mf, 1.0, 0.95), device, loop_repeats, 1)
            rows.append([f"{batch}x{length}", mode, label, f"{t_loop * 1e3:.3f}", "1.0x", "", ""])
            for backend in backends_for(device):
                reps = loop_repeats if backend == "torch" else repeats
                t = median_time(lambda: rlhf_kernels.gae(r, v, m, gamma=1.0, lam=0.95, mode=mode,
                                                         backend=backend), device, reps)
                gbs = moved / t / 1e9
                rows.append([f"{batch}x{length}", mode, backend, f"{t * 1e3:.3f}",
                             f"{t_loop / t:.1f}x", f"{gbs:.1f}", f"{100 * moved / t / ceiling:.0f}%"])
    header = ["B x T", "mode", "implementation", "ms (median)", "vs loop", "GB/s",
              "% of copy BW"]
    return ceiling, markdown_table(header, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="zero,skip")
    p.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--loop-repeats", type=int, default=5)
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ceiling, table = run(device, shapes, args.modes.split(","), args.repeats, args.loop_repeats)
    command = "python benchmarks/bench_gae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# GAE benchmark\n\n{environment(device)}\n\ncommand: `{command.strip()}`\n\n"
            f"measured copy bandwidth (ceiling): {ceiling / 1e9:.1f} GB/s; fp32 rewards/values, "
            f"bool mask, gamma=1, lam=0.95, right-padded rows\n\n{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
