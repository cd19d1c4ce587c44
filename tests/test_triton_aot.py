"""Every Triton kernel compiles for real GPUs (sm_80, sm_90), with no GPU here.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics only; a kernel it accepts
can still be rejected by the compiler. triton.compile goes through TTIR -> TTGIR -> LLVM -> PTX
-> cubin (Triton's bundled ptxas) for the target we name.
"""
import importlib
import pkgutil

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import rlhf_kernels.triton as kernels_pkg  # noqa: E402
from rlhf_kernels._backends import triton_interpret  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.skipif(
    triton_interpret(), reason="TRITON_INTERPRET=1 replaces @triton.jit by the interpreter; "
    "the compile check runs in the pytest pass without it (make test runs both)")]


def _modules():
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        yield importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")


def _variants():
    for module in _modules():
        for kernel, sig, consts, num_warps in getattr(module, "aot_variants", lambda: [])():
            name = f"{module.__name__.rsplit('.', 1)[1]}.{kernel.__name__}"
            key = "-".join(f"{k}={v}" for k, v in consts.items())
            yield pytest.param(kernel, sig, consts, num_warps,
                               id=f"{name}-{sig[next(iter(sig))]}-{key}")


def test_every_kernel_has_aot_variants():
    # kernels defined (not imported) in each module; _helpers are inlined into their callers
    jitted = {(m.__name__, n) for m in _modules() for n, obj in vars(m).items()
              if isinstance(obj, triton.runtime.jit.JITFunction) and not n.startswith("_")
              and obj.fn.__module__ == m.__name__}
    covered = {(m.__name__, k.__name__) for m in _modules()
               for k, *_ in getattr(m, "aot_variants", lambda: [])()}
    assert jitted, "no Triton kernels found"
    assert jitted <= covered, f"kernels without an AOT compile check: {sorted(jitted - covered)}"


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("kernel,sig,consts,num_warps", list(_variants()))
def test_compiles_to_cubin(kernel, sig, consts, num_warps, arch):
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert len(compiled.asm["cubin"]) > 0
    assert f"sm_{arch}" in compiled.asm["ptx"]
