"""`python -m rlhf_kernels report`: what was built, and what each op runs on here;
`python -m rlhf_kernels selftest`: every op x backend here against the float64 reference."""
import argparse
import platform
import sys

import torch

from . import __version__, _backends
from .ops import OPS


def report(out=None) -> None:
    out = out or sys.stdout
    ext, why = _backends.extension()
    print(f"rlhf_kernels {__version__}  torch {torch.__version__}  python "
          f"{platform.python_version()}  ({platform.machine()})", file=out)
    cuda = (f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
            if torch.cuda.is_available() else "none")
    print(f"CUDA device: {cuda}", file=out)
    ok, twhy = _backends.triton_status()
    tver = __import__("triton").__version__ if ok else "-"
    print(f"triton: {tver}{'' if ok else '  (' + twhy + ')'}  TRITON_INTERPRET="
          f"{'1' if _backends.triton_interpret() else '0'}", file=out)
    print("\nextension rlhf_kernels._C: " + ("built" if ext else f"missing: {why}"), file=out)
    if ext is not None:
        for key, value in sorted(ext.build_info.items()):
            print(f"  {key:12s} {value}", file=out)
    print("\nop x backend (auto picks, for CUDA tensors: cuda > triton > torch; "
          "for CPU tensors: cpu > torch)", file=out)
    width = max(len(op) for op in OPS) + 2
    print("".join(f"{h:{w}s}" for h, w in [("op", width)] + [(b, 11) for b in _backends.BACKENDS]),
          file=out)
    notes = []
    for op, backends in OPS.items():
        cells = []
        for backend in _backends.BACKENDS:
            if backend not in backends:
                cells.append("-")
                continue
            ok, why = _backends.kernel_status(op, backend)
            cells.append(("available" if ok else "not built") + ("*" if why else ""))
            if why:
                notes.append(f"  {op}/{backend}: {why}")
        print(f"{op:{width}s}" + "".join(f"{c:11s}" for c in cells), file=out)
    if notes:
        print("\n* " + "\n".join(notes).lstrip(), file=out)
    print("\nto check that every available kernel computes the right numbers here: "
          "python -m rlhf_kernels selftest", file=out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rlhf_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="build flags, and which backend each op can run on")
    check = commands.add_parser(
        "selftest", help="every op x available backend x dtype against the float64 reference; "
        "exit status 1 on any failure")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="the device whose backends to check (default: cuda when present)")
    check.add_argument("--ops", default=None,
                       help="comma-separated ops to check (default: all)")
    check.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser.parse_args(argv)


def run_selftest(args) -> int:
    from . import selftest
    device = args.device or selftest.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        print(f"selftest: --device cuda needs a CUDA device, and torch {torch.__version__} "
              "sees none; run with --device cpu", file=sys.stderr)
        return 2
    ops = None if args.ops is None else [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops or ()) - set(selftest.CASES))
    if unknown or ops == []:
        print(f"selftest: --ops {args.ops!r}: unknown op(s) {unknown}; the ops are "
              f"{', '.join(selftest.CASES)}", file=sys.stderr)
        return 2
    return selftest.main(device, ops, args.json, args.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "selftest":
        return run_selftest(args)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
