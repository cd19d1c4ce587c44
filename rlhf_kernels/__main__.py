"""`python -m rlhf_kernels report`: what was built, and what each op runs on here."""
import argparse
import platform
import sys

import torch

from . import __version__, _backends
from .ops import OPS


def report(out=sys.stdout) -> None:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_kernels")
    parser.add_argument("command", choices=["report"], help="report: build flags and backends")
    parser.parse_args(argv)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
