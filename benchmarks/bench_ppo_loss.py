"""PPO actor loss: the float32 torch baseline trainers run vs ppo_actor_loss on every backend;
and the fused LM head + loss vs the unfused one.

    python benchmarks/bench_ppo_loss.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                        [--out benchmarks/results/ppo_loss_cpu.md]

Times: forward, backward, forward+backward (medians). Peak memory: growth over the inputs
during one forward+backward, each implementation in a fresh process (CUDA: max allocated;
CPU: peak RSS). Floor: logits read once forward, read once + grad written once backward, so
GB/s = 3 * B*T*V*bytes / time, against the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rlhf_kernels  # noqa: E402
from rlhf_kernels import _backends  # noqa: E402
from common import (copy_bandwidth, environment, markdown_table, median_time,  # noqa: E402
                    publish, sync)
from ppo_loss_baselines import baseline_actor_loss, baseline_linear_actor_loss  # noqa: E402

GPU_SHAPES = [(8, 512, 32000), (16, 1024, 32000), (4, 1024, 152064)]
CPU_SHAPES = [(4, 256, 32000), (2, 128, 32000), (1, 128, 152064)]
GPU_LINEAR = [(8192, 4096, 32000), (4096, 896, 151936)]   # (tokens, hidden, vocab)
CPU_LINEAR = [(1024, 576, 49152)]                          # SmolLM2-135M head
KW = dict(kl_coef=0.1, entropy_coef=0.01)


def inputs(shape, dtype, device, linear=False):
    """Leaf tensors made in place (no transient copies: they would blur the peak memory)."""
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *size: torch.empty(size, dtype=dtype, device=device).normal_(generator=g)  # noqa
    if linear:
        n, h, v = shape
        b, t = 1, n
        first = (randn(1, n, h), randn(v, h).mul_(h ** -0.5))
    else:
        b, t, v = shape
        first = (randn(b, t, v).mul_(2),)
    for x in first:
        x.requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g, device=device)
    small = lambda: torch.empty(b, t, device=device).normal_(generator=g)  # noqa: E731
    old, adv, ref = small() - 10, small(), small() - 10
    mask = torch.empty(b, t, device=device).uniform_(generator=g) > 0.1
    return first, (labels, old, adv, mask, ref)


def loss_fn(impl: str, linear: bool):
    if impl == "baseline":
        if linear:
            return lambda first, rest: baseline_linear_actor_loss(*first, *rest[:4], rest[4], **KW)
        return lambda first, rest: baseline_actor_loss(*first, *rest[:4], rest[4], **KW)
    if linear:
        return lambda first, rest: rlhf_kernels.fused_linear_ppo_actor_loss(
            *first, *rest[:4], ref_logprobs=rest[4], backend=impl, **KW).loss
    return lambda first, rest: rlhf_kernels.ppo_actor_loss(
        *first, *rest[:4], ref_logprobs=rest[4], backend=impl, **KW).loss


def measure_peak(impl, shape, dtype, device, linear) -> int:
    """Run in a fresh process: peak memory growth of one forward+backward over the inputs."""
    first, rest = inputs(shape, dtype, device, linear)
    f = loss_fn(impl, linear)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        f(first, rest).backward()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # warm up lazily loaded code on a tiny input so that it does not count
    small = (1, 2, 8) if not linear else (2, 4, 8)
    f2 = loss_fn(impl, linear)
    f2(*inputs(small, dtype, device, linear)).backward()
    base = peak_rss()
    f(first, rest).backward()
    return peak_rss() - base


def peak_rss() -> int:
    """VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's peak
    over fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_in_fresh_process(impl, shape, dtype, device, linear) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-one",
           json.dumps([impl, list(shape), str(dtype).split(".")[1], device.type, linear])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def time_impl(impl, shape, dtype, device, linear, repeats):
    """(forward, backward, forward+backward) median seconds, each timed on its own."""
    first, rest = inputs(shape, dtype, device, linear)
    f = loss_fn(impl, linear)

    def fwd():
        with torch.no_grad():
            f(first, rest)

    def loss_with_graph():
        for x in first:
            x.grad = None
        return f(first, rest)

    def fwd_bwd():
        loss_with_graph().backward()

    t_fwd = median_time(fwd, device, repeats)
    t_bwd = median_time(lambda loss: loss.backward(), device, repeats, setup=loss_with_graph)
    t_fb = median_time(fwd_bwd, device, repeats)
    return t_fwd, t_bwd, t_fb


def impls_for(device):
    out = ["baseline"]
    for name in ("cuda", "triton", "cpu"):
        if name == "cpu" and device.type != "cpu" or name != "cpu" and device.type != "cuda":
            continue
        if _backends.kernel_status("logprobs", name)[0]:
            out.append(name)
    return out


def peak_ratio(peak: int, base_peak: int) -> str:
    """Peak memory against the baseline's; "n/a" where the baseline's growth is 0 (a tiny
    shape whose buffers the allocator already held)."""
    return f"{peak / base_peak:.2f}" if base_peak > 0 else "n/a"


def run(device, dtype, shapes, linear_shapes, repeats):
    ceiling = copy_bandwidth(device)
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for shape in shapes:
        b, t, v = shape
        floor_bytes = 3 * b * t * v * elem
        base = None
        for impl in impls_for(device):
            tf, tb, tfb = time_impl(impl, shape, dtype, device, False, repeats)
            peak = peak_in_fresh_process(impl, shape, dtype, device, False)
            base = base or (tfb, peak)
            gbs = floor_bytes / tfb / 1e9
            rows.append([f"{b}x{t}x{v}", impl, f"{tf * 1e3:.1f}", f"{tb * 1e3:.1f}",
                         f"{tfb * 1e3:.1f}", f"{base[0] / tfb:.2f}x", f"{gbs:.1f}",
                         f"{100 * floor_bytes / tfb / ceiling:.0f}%", f"{peak / 2**20:.0f}",
                         peak_ratio(peak, base[1])])
    header = ["B x T x V", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "speed-up", "GB/s",
              "% copy BW", "peak MiB", "peak vs baseline"]
    table = markdown_table(header, rows)
    lrows = []
    for shape in linear_shapes:
        n, h, v = shape
        flops = 3 * 2 * n * h * v  # model FLOPs: head forward, grad-hidden, grad-weight
        base = None
        for impl in impls_for(device):
            _, _, tfb = time_impl(impl, shape, dtype, device, True, max(3, repeats // 4))
            peak = peak_in_fresh_process(impl, shape, dtype, device, True)
            base = base or (tfb, peak)
            label = "unfused head + baseline" if impl == "baseline" else f"fused ({impl})"
            lrows.append([f"{n}x{h}x{v}", label, f"{tfb * 1e3:.1f}", f"{base[0] / tfb:.2f}x",
                          f"{flops / tfb / 1e12:.2f}", f"{peak / 2**20:.0f}",
                          peak_ratio(peak, base[1])])
    lheader = ["N x H x V", "impl", "fwd+bwd ms", "speed-up", "TFLOP/s (model)", "peak MiB",
               "peak vs unfused"]
    return ceiling, table, markdown_table(lheader, lrows) if lrows else ""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure-one"]:
        impl, shape, dtype, dev, linear = json.loads(argv[1])
        print(measure_peak(impl, tuple(shape), getattr(torch, dtype), torch.device(dev), linear))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shapes", default=None, help="BxTxV,... (default per device)")
    p.add_argument("--linear-shapes", default=None, help="NxHxV,... ('' to skip)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    parse = lambda s: [tuple(int(x) for x in item.split("x")) for item in s.split(",") if item]  # noqa
    gpu = device.type == "cuda"
    shapes = parse(args.shapes) if args.shapes else (GPU_SHAPES if gpu else CPU_SHAPES)
    linear = (parse(args.linear_shapes) if args.linear_shapes is not None
              else (GPU_LINEAR if gpu else CPU_LINEAR))
    ceiling, table, ltable = run(device, dtype, shapes, linear, args.repeats)
    command = "python benchmarks/bench_ppo_loss.py " + " ".join(argv)
    text = (f"# PPO actor loss benchmark\n\n{environment(device)}\n\ncommand: `{command.strip()}`"
            f"\n\nlogits {dtype}; loss with entropy (coef 0.01) and k3 KL (coef 0.1), clip 0.2, "
            f"token-mean; measured copy bandwidth (ceiling): {ceiling / 1e9:.1f} GB/s. fwd, bwd and "
            f"fwd+bwd are each the median of {args.repeats} separately timed runs, so the first "
            f"two need not add up to the third.\n\n{table}\n")
    if ltable:
        text += f"\n## LM head + loss (hidden, weight in {dtype})\n\n{ltable}\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
