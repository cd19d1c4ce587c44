"""Rotary position embedding in plain PyTorch, Hugging Face's two-halves convention, bit for bit:
x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], written as the halves swapped
times a signed sin [-sin_lo, sin_hi]. Differentiable."""
import torch


def rope_tables(cos: torch.Tensor, sin: torch.Tensor):
    """HF's cos, sin [B, T, D] -> cos and the signed sin [B, T, 1, D] (broadcast over heads)."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, T, H, D] with tables [B, T, 1, D]."""
    swapped = x.roll(x.shape[-1] // 2, -1)  # [x2, x1]
    return x * cos + swapped * signed_sin
