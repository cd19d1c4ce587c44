"""Checks a compile-only CUDA build: the module loads with no GPU, has the CUDA entry points,
and embeds device code for every requested architecture.

    python tools/check_cuda_build.py BUILD_LIB "8.0;9.0"
"""
import glob
import importlib.util
import os
import re
import sys

import torch

ENTRY_POINTS = ["gae_cuda", "logprobs_fwd_cuda", "logprobs_bwd_cuda", "decode_attention_cuda",
                "sample_cuda"]


def main(build_lib: str, archs: str) -> int:
    paths = glob.glob(os.path.join(build_lib, "rlhf_kernels", "_C*.so"))
    if not paths:
        print(f"no rlhf_kernels/_C*.so under {build_lib}")
        return 1
    spec = importlib.util.spec_from_file_location("rlhf_kernels._C", paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # resolves every symbol: a link error fails here
    info = module.build_info
    print(f"loaded {paths[0]} with torch {torch.__version__}: {info}")
    missing = [name for name in ENTRY_POINTS if not hasattr(module, name)]
    if info["cuda"] != "yes" or missing:
        print(f"CUDA entry points missing: {missing} (cuda={info['cuda']})")
        return 1
    blob = open(paths[0], "rb").read()
    # each cubin in the fatbinary is an ELF whose producer string names its sm_XX target
    found = set(re.findall(rb"sm_(\d+)", blob))
    want = {a.replace(".", "").encode() for a in archs.replace(",", ";").split(";") if a}
    print(f"device code for sm_{{{','.join(sorted(x.decode() for x in found))}}}")
    if not want <= found:
        print(f"missing architectures: {sorted(x.decode() for x in want - found)}")
        return 1
    print("CUDA build OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
