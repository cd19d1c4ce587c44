"""`python -m rlhf_kernels selftest`: every op on every backend that can run on the chosen
device, each dtype it accepts, forward and backward on small random inputs, against the float64
reference (rlhf_kernels.reference) within the test suite's bounds (selftest_tolerances).
Prints one row per op x backend x dtype; a kernel that raises or misses a bound is a failed
row, never a crash of the run. Run it first on a new machine."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import _backends
from . import selftest_cases as train
from . import selftest_layer_cases as layer
from .ops import OPS

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Case:
    kernels: Optional[str]  # the OPS entry whose backends run the op (None: torch only)
    dtypes: tuple
    run: Callable


# The float32-only entries: the fused head compares against float64 in float32 only (its
# bf16 logits are rounded to bf16 before the log-prob pass, which no test bound covers); the
# critic loss and the layer ops' kernels take float32 (other dtypes run the reference itself).
CASES = {
    "gae": Case("gae", (F32, BF16, F16), train.gae_case),
    "logprobs": Case("logprobs", (F32, BF16, F16), train.logprobs_case),
    "ppo_actor_loss": Case("logprobs", (F32, BF16, F16), train.ppo_actor_case),
    "ppo_critic_loss": Case(None, (F32,), train.critic_case),
    "fused_linear_logprobs": Case("logprobs", (F32,), train.fused_logprobs_case),
    "fused_linear_ppo_actor_loss": Case("logprobs", (F32,), train.fused_ppo_case),
    "decode_attention": Case("decode_attention", (F32, BF16, F16), layer.decode_case),
    "sample": Case("sample", (F32, BF16), layer.sample_case),
    "rms_norm": Case("rms_norm", (F32,), layer.rms_norm_case),
    "rope": Case("rope", (F32,), layer.rope_case),
    "swiglu": Case("swiglu", (F32,), layer.swiglu_case),
}


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    max_error: Optional[float]
    tolerance: Optional[float]
    ok: bool
    note: str  # the worst check, or the exception
    seconds: float
    checks: list = field(default_factory=list)  # every check: name, error, tolerance, ok


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_status(kernels: Optional[str], backend: str, device: torch.device):
    """(runs, reason): whether `backend` of the kernels `kernels` runs tensors on `device`."""
    if kernels is None:
        return backend == "torch", None
    if backend == "cpu" and device.type != "cpu":
        return False, "runs CPU tensors only"
    if backend == "cuda" and device.type != "cuda":
        return False, "runs CUDA tensors only"
    if backend == "triton" and device.type == "cpu" and not _backends.triton_interpret():
        return False, "runs CPU tensors only with TRITON_INTERPRET=1"
    return _backends.kernel_status(kernels, backend)


def run_row(op: str, case: Case, backend: str, dtype, device, seed: int) -> Row:
    name = str(dtype).replace("torch.", "")
    start = time.perf_counter()
    setup = train.Setup(backend, dtype, device, torch.Generator().manual_seed(seed))
    try:
        checks = case.run(setup)
    except Exception as e:  # a broken kernel is a failed row, and the run goes on
        first = (str(e).strip().splitlines() or [""])[0]
        return Row(op, backend, name, None, None, False, f"{type(e).__name__}: {first}"[:160],
                   time.perf_counter() - start)
    if not checks:
        return Row(op, backend, name, None, None, False, "the case checked nothing",
                   time.perf_counter() - start)
    worst = max(checks, key=lambda c: c.ratio)
    failed = sum(not c.ok for c in checks)
    note = worst.name if not failed else f"FAILED: {worst.name}" + (
        f" (and {failed - 1} more)" if failed > 1 else "")
    return Row(op, backend, name, worst.error, worst.tolerance, not failed, note,
               time.perf_counter() - start, [dict(asdict(c), ok=c.ok) for c in checks])


def run(device: str, ops=None, seed: int = 0):
    """(rows, skipped): the rows run on `device`, and (op, backend, reason) of those that
    cannot run there. An op of OPS with no case here is a failed row: nothing goes unchecked."""
    dev = torch.device(device)
    rows, skipped = [], []
    for op in ops or list(CASES) + [op for op in OPS if op not in CASES]:
        case = CASES.get(op)
        if case is None:
            rows.append(Row(op, "-", "-", None, None, False, "no selftest case for this op", 0.0))
            continue
        backends = OPS[case.kernels] if case.kernels else ("torch",)
        for backend in backends:
            try:
                runs, why = backend_status(case.kernels, backend, dev)
            except Exception as e:  # a broken kernel table is a failed row too
                rows.append(Row(op, backend, "-", None, None, False,
                                f"kernel_status: {type(e).__name__}: {e}"[:160], 0.0))
                continue
            if not runs:
                skipped.append((op, backend, why))
                continue
            rows.extend(run_row(op, case, backend, dtype, dev, seed) for dtype in case.dtypes)
    return rows, skipped


def _number(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(rows) -> str:
    widths = (max([len(r.op) for r in rows] + [2]), 7, 8, 10, 10, 4)
    heads = ("op", "backend", "dtype", "max error", "tolerance", "ok")
    lines = ["  ".join(f"{h:{w}s}" for h, w in zip(heads, widths)) + "  check"]
    for r in rows:
        cells = (r.op, r.backend, r.dtype, _number(r.max_error), _number(r.tolerance),
                 "ok" if r.ok else "FAIL")
        lines.append("  ".join(f"{c:{w}s}" for c, w in zip(cells, widths)) + "  " + r.note)
    return "\n".join(lines)


def format_skipped(skipped) -> str:
    """One line per reason: the op/backend pairs it keeps from running here."""
    by_reason = {}
    for op, backend, why in skipped:
        by_reason.setdefault(why, []).append(f"{op}/{backend}")
    return "\n".join(f"not run ({why}): {', '.join(pairs)}" for why, pairs in by_reason.items())


def main(device: str, ops=None, json_path=None, seed: int = 0, out=None) -> int:
    """Runs the selftest and prints the table; 0 when every row passed, 1 otherwise."""
    out = out or sys.stdout
    start = time.perf_counter()
    rows, skipped = run(device, ops, seed)
    print(f"rlhf_kernels selftest on {device} (seed {seed}, TRITON_INTERPRET="
          f"{'1' if _backends.triton_interpret() else '0'}): kernel vs float64 reference, "
          "the largest error relative to its bound", file=out)
    print(format_table(rows), file=out)
    if skipped:
        print(format_skipped(skipped), file=out)
    failed = [r for r in rows if not r.ok]
    seconds = time.perf_counter() - start
    print(f"{len(rows) - len(failed)}/{len(rows)} passed, {len(failed)} failed "
          f"in {seconds:.1f} s", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "seed": seed, "seconds": seconds,
                       "rows": [asdict(r) for r in rows],
                       "skipped": [dict(op=o, backend=b, reason=w) for o, b, w in skipped]},
                      f, indent=1)
    return 1 if failed else 0
