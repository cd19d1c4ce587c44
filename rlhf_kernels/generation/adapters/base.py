"""What every model adapter shares: the decoder loop and in-place access to HF weights.

An adapter reads the tensors of a Hugging Face model where they are (no copy: weights updated
by training, merged LoRA or gathered ZeRO-3 parameters are seen as they are at call time) and
runs the model's math with plain tensor ops, calling `attend` for attention. A family defines
`embed`, `prepare` (per-step positional tables), `block` (one decoder layer) and `head`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ... import _backends
from ...ops.rms_norm import rms_norm as fused_norm_op
from ...ops.rope import rotate_rows
from ...ops.rope import rotate as fused_rotate_op
from ...ops.swiglu import swiglu as fused_swiglu_op
from ...reference.rms_norm import rms_norm  # HF's rounding; the adapters' default
from ...reference.rope import rotate


class Unsupported(Exception):
    """The model is of a known family but uses a feature the adapter does not implement."""


def linear(module):
    """(weight, bias) of an nn.Linear-like module, seen through a merged LoRA wrapper."""
    if hasattr(module, "base_layer"):  # peft LoraLayer, merged (checked by the adapter)
        module = module.base_layer
    return module.weight, module.bias


def dense(x, module, project=F.linear):
    weight, bias = linear(module)
    return project(x, weight, bias)


def layer_norm(x, module):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _kernel_applies(op: str, backend: str, device, dtype) -> bool:
    """Whether our kernel of a layer op serves this model (the generation backend "torch"
    keeps the torch math; any other lets the table decide, as backend "auto")."""
    if backend == "torch":
        return False
    return _backends.choose(op, "auto", device, dtype) != "torch"


# Without autograd (generation, experience forwards) the adapters call the forward kernels
# themselves: the ops' argument checks and backend choice were settled once, by use_kernels
# for the model's dtype and device, and cost more than the kernel at decode sizes (RoPE on
# one token: ~50 us through rlhf_kernels.ops.rope.rotate, ~12 us the kernel).

def _layer_kernel(op: str, backend: str, device, dtype, grad: bool, differentiable):
    """`differentiable` (the op) with grad, the op's CPU forward kernel without; None where our
    kernels do not apply."""
    if not _kernel_applies(op, backend, device, dtype):
        return None
    return differentiable if grad else _backends.kernel(op, "cpu")[0]


def fused_rms_norm(backend: str, device, dtype, grad: bool = True):
    """Our CPU kernels for RMSNorm, forward and backward (rlhf_kernels.ops.rms_norm): one pass
    where ATen runs a chain of ops (~30 us per call at decode sizes, ~16 autograd nodes in
    training); without grad the forward kernel alone; None where they do not apply."""
    return _layer_kernel("rms_norm", backend, device, dtype, grad, fused_norm_op)


def fused_rotate(backend: str, device, dtype, grad: bool = True):
    """Our CPU kernel for RoPE, forward and backward (rlhf_kernels.ops.rope); without grad the
    forward kernel alone; None where it does not apply."""
    kernel = _layer_kernel("rope", backend, device, dtype, grad, fused_rotate_op)
    return kernel if grad or kernel is None else functools.partial(rotate_rows, kernel)


def fused_swiglu(backend: str, device, dtype, grad: bool = True):
    """Our CPU kernels for silu(gate) * up, forward and backward (rlhf_kernels.ops.swiglu);
    without grad the forward kernel alone; None where they do not apply."""
    return _layer_kernel("swiglu", backend, device, dtype, grad, fused_swiglu_op)


def skinny_linear(backend: str, device, dtype):
    """Our CPU kernel for projections of <= 8 rows (a decode step at batch <= 8), where a
    general GEMM is slower than streaming the weight; None where it does not apply."""
    if not _kernel_applies("skinny_linear", backend, device, dtype):
        return None
    (kernel,) = _backends.kernel("skinny_linear", "cpu")

    def linear(x, weight, bias=None):
        if x.dim() != 2 or x.shape[0] > SKINNY_MAX_ROWS or weight.dtype != torch.float32:
            return F.linear(x, weight, bias)
        return kernel(x, weight, bias)
    return linear


SKINNY_MAX_ROWS = 8  # csrc/skinny_linear.h


def cpu_attention_kernel():
    """The CPU decode-attention kernel of the table (None when the extension is not built)."""
    loaded, _ = _backends._entries("decode_attention", "cpu")
    return None if loaded is None else loaded[0]


def decode_layer_kernel():
    """csrc/decode_layer.h: a Llama-family block for a decode step, composed of the CPU
    kernels of the table (rms_norm, skinny_linear, rope, decode_attention, swiglu) in the
    Python block's order, so its result is that block's bit for bit. Used only where the
    adapter runs every one of those kernels; None when the extension lacks it."""
    ext, _ = _backends.extension()
    return getattr(ext, "llama_decode_layer_cpu", None)


class DecoderAdapter:
    family = "?"
    max_positions = None   # learned position tables bound the length; RoPE does not
    linear = staticmethod(F.linear)  # projections; use_kernels() may swap in our CPU kernel
    rms_norm = staticmethod(rms_norm)  # likewise
    rotate = staticmethod(rotate)  # RoPE (Llama family); likewise

    def __init__(self, model):
        self.model, self.config = model, model.config
        for name, module in model.named_modules():
            # peft keeps lora_A among the submodules: a dict lookup, where getattr on a module
            # without it raises and catches inside nn.Module (most of this loop's time)
            if len(module._modules.get("lora_A") or ()) and not getattr(module, "merged", False):
                raise Unsupported(f"LoRA adapters are not merged ({name}); merge them first")
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.windows = [None] * self.num_layers   # sliding window per layer (None = full)
        self.graph_safe = True                    # False when a step needs host syncs

    # -- the family's math ------------------------------------------------------------------
    def embed(self, ids, positions):
        raise NotImplementedError

    def prepare(self, positions, like):
        return None

    def tabulate_positions(self, length: int) -> None:
        """Precompute what prepare() derives from positions < length, for a decode loop that
        calls it once per step; families without per-position tables ignore it."""

    def block(self, index, layer, h, shape, tables, attend):
        """h [B * T, hidden] (tokens flattened: every projection is one GEMM) -> same."""
        raise NotImplementedError

    def head(self, h):
        """Hidden states out of the last block [..., hidden] -> logits [..., V]."""
        raise NotImplementedError

    def final_norm(self, h):
        """Hidden states out of the last block -> the base model's last_hidden_state (what a
        value head reads); families that do not need it for value models leave it out."""
        raise Unsupported(f"{self.family}: no last_hidden_state on the fused path")

    # -- the loop -------------------------------------------------------------------------
    def blocks_out(self, ids, positions, attend):
        """ids, positions [B, T] -> hidden states out of the last block [B, T, hidden].
        Differentiable with the torch math (use_kernels("torch")); generation runs it under
        no_grad."""
        h = self.embed(ids, positions)
        tables = self.prepare(positions, h)
        batch, length, width = h.shape
        h = h.view(batch * length, width)
        for index, layer in enumerate(self.blocks):
            h = self.block(index, layer, h, (batch, length), tables, attend)
        return h.view(batch, length, -1)

    def forward(self, ids, positions, attend):
        """ids, positions [B, T] -> logits of the last position [B, V]."""
        return self.head(self.blocks_out(ids, positions, attend)[:, -1])

    def use_kernels(self, backend: str, grad: bool = False) -> None:
        """Our CPU kernels where they apply; with grad only the differentiable ones."""
        skinny = None if grad else skinny_linear(backend, self.device, self.dtype)
        self.linear = skinny or F.linear
        self.rms_norm = fused_rms_norm(backend, self.device, self.dtype, grad) or rms_norm
        self.rotate = fused_rotate(backend, self.device, self.dtype, grad) or rotate

    def check_length(self, total: int) -> None:
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens exceeds the model's "
                             f"{self.max_positions} positions")
