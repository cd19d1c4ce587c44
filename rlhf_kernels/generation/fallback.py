"""The path for causal LMs without an adapter: HF `generate`, then one forward for the log-probs."""
from __future__ import annotations

import logging

import torch

from ..ops.logprobs import logprobs as token_logprobs

log = logging.getLogger("rlhf_kernels.generation")
_said = set()


def say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("rlhf_kernels.generation: %s; using model.generate plus one forward for "
                    "the log-probs (slower)", reason)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as HF generate computes them (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] int64: 1 up to and including the first EOS of each row."""
    is_eos = torch.isin(tokens, eos_ids).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).long()


@torch.no_grad()
def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float):
    """log_softmax(logits / T) of each response token under a teacher-forced forward; [B, N]."""
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask))
    logits = out.logits[:, prompt_len - 1:-1]
    return token_logprobs(logits, sequences[:, prompt_len:],
                          temperature=temperature if temperature > 0 else 1.0)


def hf_generate(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_k, top_p,
                eos_ids, pad_token_id):
    """(response tokens [B, N], logprobs [B, N] float32, response mask [B, N])."""
    options = dict(do_sample=False)
    if temperature > 0:
        options = dict(do_sample=True, temperature=temperature, top_k=top_k or None,
                       top_p=top_p)
    prompt_len = input_ids.shape[1]
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                               max_new_tokens=max_new_tokens, min_new_tokens=0,
                               eos_token_id=eos_ids.tolist(), pad_token_id=pad_token_id,
                               **options)
    response = sequences[:, prompt_len:]
    mask = response_mask_from(response, eos_ids.to(response.device))
    full_mask = torch.cat([attention_mask.long(), mask], dim=1)
    logp = response_logprobs(model, sequences, full_mask, prompt_len, temperature)
    return response, logp.float() * mask, mask
