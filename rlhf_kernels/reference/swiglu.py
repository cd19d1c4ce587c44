"""The gated MLP activation of Llama-family models in plain PyTorch: silu(gate) * up, as the
Hugging Face MLP computes it. Differentiable."""
import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
