"""Timing, the measured memory-bandwidth ceiling, and the table every benchmark prints."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int, warmup: int = 2, setup=None) -> float:
    """Median wall time of fn() in seconds (CUDA events on GPU). With `setup`, each repeat
    first runs setup() untimed and times fn(setup's result) (e.g. a backward alone)."""
    def once():
        args = () if setup is None else (setup(),)
        if device.type == "cuda":  # events are stream-ordered: setup's queued work is not timed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    if device.type == "cpu":
        nbytes = 64 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats=20)
    return 2 * nbytes / t


def read_bandwidth(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Measured streaming read bandwidth in bytes/s (a sum over a buffer far larger than cache)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    return nbytes / median_time(lambda: src.sum(), device, repeats=10)


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name += f", {torch.get_num_threads()} threads"
    try:
        import triton
        tver = triton.__version__
    except ImportError:
        tver = "-"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"device: {name}; date: {datetime.date.today()}; torch {torch.__version__}; "
            f"triton {tver}; python {platform.python_version()}; commit {commit}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def publish(text: str, out: str | None) -> None:
    """Print a benchmark's report, and write it to `out` when given."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
