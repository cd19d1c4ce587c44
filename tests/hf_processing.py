"""Transformers' own processed next-token distributions: the reference of the processor tests.

The processor list is the one HF's `generate` builds for a config (`_get_logits_processor`,
its order and its arithmetic), given the prompts' attention mask as generate gives it.
"""
import math

import torch

from rlhf_kernels.generation import position_ids_from_mask


def hf_processors(model, prompt_ids, prompt_mask, **options):
    """HF's LogitsProcessorList for a generate call with `options` on these prompts, the
    options resolved as generate resolves them (over the model's and transformers' defaults,
    top_k=50 among them)."""
    config, _ = model._prepare_generation_config(None, **options)
    # the EOS tensor HF's min-length processors read, set as generate sets it
    model._prepare_special_tokens(config, True, device=prompt_ids.device)
    return model._get_logits_processor(generation_config=config,
                                       input_ids_seq_length=prompt_ids.shape[1],
                                       model_kwargs={"attention_mask": prompt_mask},
                                       device=str(prompt_ids.device))


@torch.no_grad()
def first_token_logits(model, prompt_ids, prompt_mask):
    """[B, V] float32 logits of the first new token, at generate's positions."""
    return model(input_ids=prompt_ids, attention_mask=prompt_mask,
                 position_ids=position_ids_from_mask(prompt_mask)).logits[:, -1].float()


def hf_first_token_probs(model, prompt_ids, prompt_mask, **options):
    """[B, V] the distribution HF's generate samples the first new token from."""
    logits = first_token_logits(model, prompt_ids, prompt_mask)
    return hf_processors(model, prompt_ids, prompt_mask, **options)(prompt_ids,
                                                                    logits).softmax(-1)


def total_variation(p, q):
    return float(0.5 * (p - q).abs().sum())


def tv_bound(probs, draws, failure=1e-6):
    """A total variation between `probs` and the histogram of `draws` iid draws from it that is
    exceeded with probability < `failure`: E[TV] <= 1/2 sum sqrt(p (1 - p) / n) (Jensen on each
    cell), and one draw moves TV by at most 1/n, so P(TV > E[TV] + t) <= exp(-2 n t^2)
    (McDiarmid's inequality)."""
    mean = 0.5 * float((probs * (1 - probs) / draws).sqrt().sum())
    return mean + math.sqrt(math.log(1 / failure) / (2 * draws))
