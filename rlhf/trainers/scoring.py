"""Scoring rollouts: the reward of step 3 (a reward model or a function on the decoded texts)
and the held-out evaluation of a policy (mean reward, KL to the reference)."""
from __future__ import annotations

import torch

from ..algorithms import response_logprobs
from ..models import ValueModel
from ..rewards import score_with_fn
from .setup import collate


class Scorer:
    """The reward of a rollout: a reward model's value at the last real token, or a callable
    fn(prompts, responses) on the decoded texts. `extra` callables are logged, not optimised."""

    def __init__(self, tokenizer, reward_model=None, reward_fn=None, extra=None, timeout=None):
        self.tokenizer, self.model, self.fn = tokenizer, reward_model, reward_fn
        self.extra, self.timeout = dict(extra or {}), timeout

    def responses(self, sequences, action_mask, prompt_len):
        tokens = sequences[:, prompt_len:].masked_fill(~action_mask.bool(), 0).tolist()
        lengths = action_mask.long().sum(1).tolist()
        return self.tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)],
                                           skip_special_tokens=True)

    @torch.no_grad()
    def __call__(self, prompts, sequences, attention_mask, action_mask):
        if self.model is not None:
            return ValueModel.score_last(self.model(sequences, attention_mask), attention_mask)
        texts = self.responses(sequences, action_mask, attention_mask.shape[1] - action_mask.shape[1])
        return score_with_fn(self.fn, prompts, texts, timeout=self.timeout).to(sequences.device)

    def extras(self, prompts, sequences, action_mask, prompt_len) -> dict[str, float]:
        if not self.extra:
            return {}
        texts = self.responses(sequences, action_mask, prompt_len)
        return {name: float(score_with_fn(fn, prompts, texts, timeout=self.timeout).mean())
                for name, fn in self.extra.items()}


@torch.no_grad()
def evaluate_policy(hybrid, reference, scorer, prompts, *, max_new_tokens, temperature,
                    batch_size, seed, device) -> dict[str, float]:
    """Mean reward, KL(policy || reference) per response (sum of log-ratios) and extra scores
    on held-out prompts, sampled with a fixed seed so runs compare."""
    generator = torch.Generator(device).manual_seed(seed)
    totals, n = {}, 0
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts, range(start, min(start + batch_size, len(prompts))))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = hybrid.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=generator)
        action = out.response_mask.bool()
        full = torch.cat([mask, out.response_mask], 1)
        metrics = {"reward": scorer(batch["prompts"], out.sequences, full, action).float(),
                   "response_len": action.sum(1).float()}
        if reference is not None:
            ref = response_logprobs(reference, out.sequences, full, ids.shape[1],
                                    temperature=temperature)
            metrics["kl"] = ((out.logprobs - ref.float()) * action).sum(1)
        rows = ids.shape[0]
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value.sum())
        for name, value in scorer.extras(batch["prompts"], out.sequences, action,
                                         ids.shape[1]).items():
            totals[name] = totals.get(name, 0.0) + value * rows
        n += rows
    return {name: total / max(n, 1) for name, total in totals.items()}
