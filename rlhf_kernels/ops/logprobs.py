"""Token log-probs and entropy from logits: checks, then the custom ops.

    logprobs(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False,
             backend="auto") -> logp  (or (logp, entropy))

z = logits / temperature; logp = z[label] - LSE(z); entropy = LSE(z) - sum softmax(z) * z.
The kernels read the logits once forward and once backward and write grad-logits once, in the
logits dtype; no float32 copy of [B, T, V] is made. With inplace_backward=True the gradient is
written into the logits' own storage (use it only when nothing reads the logits after backward).
Outputs are float32 (float64 for float64 logits, so that gradcheck can run).

The kernels are the torch.library ops rlhf_kernels::logprobs_fwd / logprobs_bwd (autograd
registered with the forward), so torch.compile sees one opaque node per call. The label range
check reads values (a host sync): it runs inside the forward op, where a compiled graph keeps
it without breaking.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from . import _checks


def float_out(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_label_range(labels: Tensor, vocab: int) -> None:
    """labels in [0, vocab) (masked ones are 0 by now); one host sync."""
    out_of_range = (labels < 0) | (labels >= vocab)
    if labels.numel() and bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) (the vocabulary of logits), found {bad}")


@torch.library.custom_op("rlhf_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd(logits: Tensor, labels: Tensor, inv_temperature: float, with_entropy: bool,
                 inplace_backward: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy or an empty tensor, lse) [B, T]; inplace_backward is for the backward."""
    check_label_range(labels, logits.shape[-1])
    forward, _ = _backends.kernel("logprobs", backend)
    return forward(logits, labels, inv_temperature, with_entropy)


@logprobs_fwd.register_fake
def _(logits, labels, inv_temperature, with_entropy, inplace_backward, backend):
    rows = logits.shape[:-1]
    logp = logits.new_empty(rows, dtype=float_out(logits.dtype))
    return logp, logp.new_empty(rows if with_entropy else (0,)), logp.new_empty(rows)


@torch.library.custom_op("rlhf_kernels::logprobs_bwd", mutates_args=("grad_logits",))
def logprobs_bwd(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
                 grad_logp: Tensor, grad_entropy: Optional[Tensor], inv_temperature: float,
                 backend: str, grad_logits: Tensor) -> None:
    """Writes d(loss)/d(logits) into grad_logits (which may be logits itself)."""
    _, backward = _backends.kernel("logprobs", backend)
    backward(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature,
             grad_logits)


@logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature, backend,
      grad_logits):
    return None


def grad_like(logits: Tensor) -> Tensor:
    """An uninitialised gradient with the logits' strides when their rows do not overlap (a
    slice logits[:, :-1] keeps its row pitch: the kernels then walk both alike), else
    contiguous."""
    b, t, v = logits.shape
    s_b, s_t, s_v = logits.stride()
    if s_v == 1 and s_t >= v and s_b >= t * s_t:
        return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                                   device=logits.device)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, with_entropy, inplace, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.options = (inv_temperature, with_entropy, inplace, backend)
    ctx.set_materialize_grads(False)  # an unused entropy sends None, not zeros


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, with_entropy, inplace, backend = ctx.options
    if not with_entropy:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 6
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad = logits if inplace else grad_like(logits)
    logprobs_bwd(logits, labels, lse, None if grad_entropy is None else entropy, grad_logp,
                 grad_entropy, inv_temperature, backend, grad)
    return grad, None, None, None, None, None


logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_labels(labels, shape, vocab: int, mask=None) -> Tensor:
    """labels of `shape` as contiguous int64; masked labels (padding) become 0 so that kernels
    never index with them. The range [0, vocab) is checked by the ops (check_label_range)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)} (logits without the vocabulary "
                         f"dim), got {tuple(labels.shape)}")
    labels = labels.long()
    return (labels if mask is None else torch.where(mask, labels, 0)).contiguous()


def check_logits_labels(logits, labels, mask=None):
    """Validated (logits [B, T, V] with a contiguous last dim, labels [B, T] int64).
    2-D logits [N, V] with labels [N] are taken as B = 1."""
    logits = _checks.float_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] (or [N, V]), got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)})")
    _checks.same_device(logits=logits, labels=labels if isinstance(labels, torch.Tensor)
                        else None, mask=mask)
    labels = check_labels(labels, logits.shape[:-1], logits.shape[-1], mask)
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, labels


def check_temperature(temperature) -> float:
    t = _checks.number("temperature", temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


def token_logprobs(logits, labels, temperature, with_entropy, backend, inplace):
    """Checked inputs -> (logp, entropy or None) [B, T] on the chosen backend."""
    name = _checks.choose("logprobs", backend, logits.device, logits.dtype)
    logp, entropy, _ = logprobs_fwd(logits, labels, 1.0 / temperature, with_entropy, inplace,
                                    name)
    return logp, (entropy if with_entropy else None)


def logprobs(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False,
             backend="auto"):
    _checks.real_tensors("logprobs", logits=logits, labels=labels)
    squeeze = logits.dim() == 2 if isinstance(logits, torch.Tensor) else False
    logits3, labels3 = check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    logp, entropy = token_logprobs(logits3, labels3, temperature, return_entropy, backend,
                                   inplace_backward)
    if squeeze:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if entropy is not None else None
    return (logp, entropy) if return_entropy else logp
