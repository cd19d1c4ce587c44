"""Sampling in plain PyTorch: temperature, top-k, top-p (nucleus), greedy.

Returns the chosen tokens and their behaviour log-probs log_softmax(logits / T)[token] over
the full vocabulary: what training recomputes at the same temperature. Greedy (T = 0) returns
the argmax and log_softmax(logits)[argmax]. The kept set (contract in csrc/decode.h): the top_k
largest logits (ties at the k-th kept) and the tokens whose strictly-more-probable mass is
below top_p; the token is the inverse CDF of the kept distribution at u, in index order.
"""
import torch


def kept_mask(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] bool: the tokens top-k / top-p keep (the most probable always stays)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        keep &= z >= kth
    if top_p < 1.0:
        probs = torch.softmax(z, dim=-1)
        ascending, _ = torch.sort(probs, dim=-1)
        suffix = ascending.flip(-1).cumsum(-1).flip(-1)  # suffix[i] = mass of ascending[i:]
        # mass strictly above p_i = suffix at the first ascending index holding a value > p_i
        first_greater = torch.searchsorted(ascending, probs, right=True)
        padded = torch.cat([suffix, torch.zeros_like(suffix[..., :1])], dim=-1)
        keep &= padded.gather(-1, first_greater) < top_p
    return keep


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator=None, uniforms=None):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32). uniforms [B] in [0, 1), if
    given, replace the draws from `generator`."""
    z = logits.float()
    if temperature == 0:
        tokens = z.argmax(-1)
        return tokens, torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    z = z / temperature
    logp_full = torch.log_softmax(z, -1)
    probs = torch.where(kept_mask(z, top_k, top_p), logp_full.exp(), 0.0)
    if uniforms is None:
        uniforms = torch.rand(z.shape[0], generator=generator, device=z.device)
    cdf = probs.cumsum(-1)
    target = uniforms[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # past the end through rounding at the top of the cdf: the last kept token
    index = torch.arange(z.shape[-1], device=z.device)
    last_kept = torch.where(probs > 0, index, -1).max(-1).values
    tokens = torch.where(tokens < z.shape[-1], tokens, last_kept)
    return tokens, logp_full.gather(-1, tokens[:, None]).squeeze(-1)
