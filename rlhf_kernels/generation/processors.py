"""The logits processors of the generation loop: transformers' own arithmetic, in its order.

HF's `generate` turns the step's logits (float32) into the sampled distribution as
    repetition_penalty -> min length -> suppress_tokens
    -> [sampling only] temperature -> top_k -> top_p -> min_p
so the loop does the same on the float32 logits before its sampler:
  - repetition_penalty p: every token id seen so far in the row (its prompt, left padding
    excluded, then every token it generated) gets logit * p where negative, logit / p otherwise.
  - min_new_tokens n: the EOS ids get -inf while fewer than n tokens have been generated (HF's
    MinLengthLogitsProcessor and MinNewTokensLengthLogitsProcessor; a min_length counts the
    padded prompt, so it arrives here as min_length - prompt width).
  - suppress_tokens: those ids get -inf (ids past the logits' width change nothing).
  - top_k with top_p < 1: HF takes top-p of the top-k distribution renormalised, the sampler's
    top-p counts the whole vocabulary; so top-k is applied here, as -inf, and the sampler does
    top-p alone.
  - min_p m: a token with softmax(z) < m * max softmax(z) gets -inf, z = logits / T after top-k.
    It runs after top-p in HF; top-p's mass is that of its input, so filtering min_p first would
    change which tokens top-p keeps: min_p with top_p < 1 is not served (`unserved`). With top-k
    alone the order does not matter: min-p compares to the top token, which top-k keeps.
Masks computed on z are written to the logits as -inf, so the sampler's own z = logits / T is
the very z they were computed on.

Everything is tensor ops on [B, V] with state on the device: no host sync, so the decode loop
keeps its pace (the sampler runs outside the captured CUDA graph, as before).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..ops import _checks
from ..reference import sample as ref_sample


@dataclass(frozen=True)
class Processing:
    """The processor options of one generate() call; neutral values turn each one off."""
    repetition_penalty: float = 1.0
    suppress_tokens: tuple = ()
    min_p: float = 0.0
    min_new_tokens: int = 0

    @classmethod
    def checked(cls, repetition_penalty=1.0, suppress_tokens=None, min_p=0.0,
                min_new_tokens=0) -> "Processing":
        penalty = _checks.number("repetition_penalty", repetition_penalty)
        if not (penalty > 0 and math.isfinite(penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {repetition_penalty}")
        min_p_value = _checks.number("min_p", min_p)
        if not 0.0 <= min_p_value <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
        if not isinstance(min_new_tokens, numbers.Integral) or isinstance(min_new_tokens, bool) \
                or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0 (0 = off), "
                             f"got {min_new_tokens!r}")
        return cls(penalty, _token_ids(suppress_tokens), min_p_value, int(min_new_tokens))

    def active(self, temperature: float, top_k: int, top_p: float) -> bool:
        """Whether the sampler alone would not give HF's distribution."""
        sampling = temperature > 0
        return (self.repetition_penalty != 1.0 or bool(self.suppress_tokens)
                or self.min_new_tokens > 0
                or sampling and (self.min_p > 0 or top_k > 0 and top_p < 1.0))


def _token_ids(tokens) -> tuple:
    if tokens is None:
        return ()
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    try:
        ids = tuple(tokens)
    except TypeError:
        raise TypeError(f"suppress_tokens must be a list of token ids, got {tokens!r}") from None
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
               for i in ids):
        raise ValueError(f"suppress_tokens must hold token ids (integers >= 0), got {tokens!r}")
    return tuple(int(i) for i in ids)


def unserved(temperature: float, top_p: float, min_p: float) -> str | None:
    """Why the fused loop cannot give HF's distribution for these options (None: it can)."""
    if temperature > 0 and min_p > 0 and top_p < 1.0:
        return (f"min_p={min_p} with top_p={top_p} is not served (transformers applies min-p "
                f"after top-p, whose kept set depends on the tokens it is given)")
    return None


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty on the tokens `seen` [B, V] bool."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def min_p_removed(z: torch.Tensor, min_p: float) -> torch.Tensor:
    """[B, V] bool: softmax(z) below min_p times its largest value. HF also keeps the top token
    whatever happens; with min_p <= 1 the top token is never below the threshold."""
    probs = torch.softmax(z, dim=-1)
    return probs < min_p * probs.amax(dim=-1, keepdim=True)


class LogitsProcessors:
    """The processors of one generation. `rows` [b] (the original rows of the running batch,
    which shrinks on the CPU) index the per-row state. Called once per step, then `observe`d."""

    def __init__(self, processing: Processing, prompt_ids, prompt_mask, *, temperature,
                 top_k, top_p, eos_ids=None):
        self.processing, self.temperature = processing, temperature
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.eos_ids = eos_ids if eos_ids is not None else torch.zeros(0, dtype=torch.long)
        self.generated = 0  # tokens appended so far: the step's index
        sampling = temperature > 0
        # top-k here when something after it must see the top-k distribution (top-p, min-p)
        self.top_k = top_k if sampling and (top_p < 1.0 or processing.min_p > 0) else 0
        self.sampler_top_k = 0 if self.top_k else top_k
        self.min_p = processing.min_p if sampling else 0.0
        self.seen = self.suppressed = None  # built at the first call, which knows V
        self.built = False

    def _build(self, vocab, device):
        self.built = True
        # EOS ids within the logits (once: the filter is a host sync on CUDA)
        self.eos_columns = self.eos_ids[self.eos_ids < vocab].to(device)
        if self.processing.repetition_penalty != 1.0:
            # HF's left padding is excluded (the mask), ids past V are dropped (column V)
            ids = self.prompt_ids.clamp(max=vocab).masked_fill(self.prompt_mask == 0, vocab)
            seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=device)
            self.seen = seen.scatter_(1, ids.to(device), True)[:, :vocab].contiguous()
        ids = [i for i in self.processing.suppress_tokens if i < vocab]
        if ids:
            self.suppressed = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.suppressed[torch.tensor(ids, device=device)] = True

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Processed float32 logits [b, V] for the sampler (temperature still to divide by)."""
        scores = logits.float()
        if not self.built:
            self._build(scores.shape[-1], scores.device)
        if self.seen is not None:
            scores = penalise(scores, self.seen[rows], self.processing.repetition_penalty)
        if self.generated < self.processing.min_new_tokens:
            scores = scores.index_fill(-1, self.eos_columns, -math.inf)
        if self.suppressed is not None:
            scores = scores.masked_fill(self.suppressed, -math.inf)
        if self.top_k or self.min_p:
            # the sampler's z (one division convention), so its masks and the sampler agree
            z = ref_sample.divide_by_temperature(scores, self.temperature)
            # top-k as the sampler's kept set: ties at the k-th stay, as in HF
            removed = ~ref_sample.kept_mask(z, self.top_k, 1.0)
            if self.min_p:
                removed |= min_p_removed(z.masked_fill(removed, -math.inf), self.min_p)
            scores = scores.masked_fill(removed, -math.inf)
        return scores

    def observe(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """The tokens [b] just appended to the rows (valid ids: pads after EOS)."""
        self.generated += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True

    def behaviour_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log_softmax(logits / T)[token] of the unprocessed logits (T = 1 when greedy), the
        non-finite rule applied as the sampler does; NaN at error rows (token < 0)."""
        z = (ref_sample.divide_by_temperature(logits, self.temperature) if self.temperature > 0
             else logits.float())
        z, _ = ref_sample.apply_nonfinite_rule(z)
        logp = torch.log_softmax(z, -1).gather(-1, tokens.clamp(min=0)[:, None])[:, 0]
        return torch.where(tokens < 0, math.nan, logp)
