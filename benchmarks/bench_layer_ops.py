"""The decoder-layer ops of the fused forwards on the CPU: RMSNorm, RoPE and SwiGLU as torch
runs them (the chains of ATen ops Hugging Face's Llama layers call) vs our C++ CPU kernels,
without grad (decode steps, experience forwards) and forward + backward (training forwards).

    python benchmarks/bench_layer_ops.py [--out benchmarks/results/layer_ops_cpu.md]

Bytes moved (the floor): every input read once and every output written once per pass (the
backward reads x / gate again). GB/s is that over the median time; the ceiling is the
measured copy bandwidth. At these sizes the data sits in cache, so the ops can pass it.
On GPUs these ops run torch's kernels (a fused RMSNorm among them): CPU only here.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, environment, markdown_table, median_time, publish  # noqa: E402
from rlhf_kernels.ops.rms_norm import rms_norm  # noqa: E402
from rlhf_kernels.ops.rope import rotate  # noqa: E402
from rlhf_kernels.ops.swiglu import swiglu  # noqa: E402
from rlhf_kernels.reference.rope import rope_tables  # noqa: E402

# (label, tokens, hidden, heads, kv heads, head dim, intermediate)
MODELS = [("tiny decode step", 32, 128, 4, 2, 32, 256),
          ("tiny minibatch", 480, 128, 4, 2, 32, 256),
          ("SmolLM2-135M, 8x32", 256, 576, 9, 3, 64, 1536)]


def cases(tokens, hidden, heads, kv_heads, head_dim, inter, grad):
    """(op, fn(backend), bytes moved) for one model shape."""
    g = torch.Generator().manual_seed(0)
    req = dict(requires_grad=grad)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_(grad)
    w = torch.randn(hidden, generator=g).requires_grad_(grad)
    q = torch.randn(1, tokens, heads + kv_heads, head_dim, generator=g, **req)
    angle = torch.rand(1, tokens, head_dim, generator=g) * 100
    cos, sin = rope_tables(angle.cos(), angle.sin())
    gate = torch.randn(tokens, inter, generator=g, **req)
    up = torch.randn(tokens, inter, generator=g, **req)

    def run(out, *inputs):
        if grad:
            torch.autograd.grad(out, inputs, torch.ones_like(out))
    passes = 2 if grad else 1
    n, m, r = x.numel() * 4, q.numel() * 4, cos.numel() * 4
    return [
        ("RMSNorm", lambda b: run(rms_norm(x, w, 1e-6, backend=b), x, w),
         2 * n + (3 * n if grad else 0)),
        ("RoPE (q and k)", lambda b: run(rotate(q, cos, sin, backend=b), q),
         passes * (2 * m + 2 * r)),
        ("SwiGLU", lambda b: run(swiglu(gate, up, backend=b), gate, up),
         3 * gate.numel() * 4 + (5 * gate.numel() * 4 if grad else 0)),
    ]


def run_all(repeats: int):
    device = torch.device("cpu")
    ceiling = copy_bandwidth(device)
    rows = []
    for label, *shape in MODELS:
        for grad in (False, True):
            context = torch.enable_grad() if grad else torch.no_grad()
            with context:
                for op, fn, moved in cases(*shape, grad):
                    t_torch = median_time(lambda: fn("torch"), device, repeats)
                    t_ours = median_time(lambda: fn("cpu"), device, repeats)
                    rows.append([label, op, "fwd+bwd" if grad else "fwd (no grad)",
                                 f"{t_torch * 1e6:.1f}", f"{t_ours * 1e6:.1f}",
                                 f"{t_torch / t_ours:.2f}x", f"{moved / t_ours / 1e9:.1f}",
                                 f"{100 * moved / t_ours / ceiling:.0f}%"])
    header = ["shape", "op", "pass", "torch us", "ours us", "speed-up", "ours GB/s",
              "% of copy BW"]
    return ceiling, markdown_table(header, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    ceiling, table = run_all(args.repeats)
    command = ("python benchmarks/bench_layer_ops.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    text = (f"# Decoder-layer ops on the CPU (RMSNorm, RoPE, SwiGLU)\n\n"
            f"{environment(torch.device('cpu'))}\n\ncommand: `{command.strip()}`\n\n"
            f"measured copy bandwidth (ceiling): {ceiling / 1e9:.1f} GB/s; float32; torch: the "
            f"ATen chains HF's Llama layers run; ours: rlhf_kernels' C++ CPU kernels\n\n"
            f"{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
