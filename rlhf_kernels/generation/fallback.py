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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] int64 that count real tokens only: cumsum(mask) - 1 at the real
    tokens (mask 1) and 0 at padding (mask 0), HF `generate`'s convention.

    A row's real tokens get 0, 1, 2, ... whether the padding is on the left (prompts), on the
    right (responses after EOS) or both, so a padded row sees the positions of the unpadded one.
    What padding positions get does not change the outputs at real tokens (no real token
    attends to padding); 0 keeps them inside every position table.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def response_mask_from(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] int64: 1 up to and including the first EOS of each row."""
    is_eos = torch.isin(tokens, eos_ids).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).long()


@torch.no_grad()
def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float):
    """log_softmax(logits / T) of each response token under a teacher-forced forward; [B, N]."""
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask))
    logits = out.logits[:, prompt_len - 1:-1]
    return token_logprobs(logits, sequences[:, prompt_len:],
                          temperature=temperature if temperature > 0 else 1.0)


def hf_generate(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_k, top_p,
                processing, eos_ids, pad_token_id):
    """(response tokens [B, N], logprobs [B, N] float32, response mask [B, N]); `processing`:
    processors.Processing, passed on as HF's own options."""
    # every option given, neutral ones too: the model's generation_config must not fill them in
    options = dict(do_sample=False, repetition_penalty=processing.repetition_penalty,
                   suppress_tokens=list(processing.suppress_tokens) or None)
    if temperature > 0:
        # top_k 0 turns HF's top-k off; None would get its default top_k=50
        options.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=processing.min_p or None)
    prompt_len = input_ids.shape[1]
    # HF's own generate: `model.generate` may be apply_rlhf_kernels' wrapper, which would
    # send this call back here (a RecursionError with unmerged LoRA)
    hf_generate_fn = model.__dict__.get("_rlhf_kernels_original_generate", model.generate)
    sequences = hf_generate_fn(input_ids=input_ids, attention_mask=attention_mask,
                               max_new_tokens=max_new_tokens,
                               min_new_tokens=processing.min_new_tokens,
                               eos_token_id=eos_ids.tolist(), pad_token_id=pad_token_id,
                               **options)
    response = sequences[:, prompt_len:]
    mask = response_mask_from(response, eos_ids.to(response.device))
    full_mask = torch.cat([attention_mask.long(), mask], dim=1)
    logp = response_logprobs(model, sequences, full_mask, prompt_len, temperature)
    return response, logp.float() * mask, mask
