"""RMSNorm in plain PyTorch, rounded as Hugging Face's Llama-family norms round it: normalise in
float32 (float64 for float64 input, so that gradcheck can run), scale in the input dtype.
Differentiable."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)  # one op, bitwise the same in fp32
    h = x.double() if x.dtype == torch.float64 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
