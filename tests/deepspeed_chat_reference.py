"""DeepSpeed-Chat's step-3 (PPO) conventions, restated in float64 for the tests that compare
them with ours (test_deepspeed_chat_differences.py). Test-only; written from the description
of its trainer, not copied from it.

Coordinates. DeepSpeed-Chat keeps whole sequences: a left padded prompt of P tokens, then N
response tokens, T = P + N, with the tokenizer's pad token after the end of each response.
Its log-probs, values and rewards live on the T - 1 "shifted" positions, where position t
scores token t + 1 (the action taken in the state after token t). The response starts at
shifted position `start = P - 1`, so `x[:, start:]` has exactly N columns, one per response
token, and column i is the response token i: the same columns as ours.

Its masks come from the pad token alone: attention_mask = (token != pad), and the mask of the
actions is that mask shifted by one. When pad == EOS, EOS is therefore masked out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


# ---------------------------------------------------------------------------------- masks

def attention_mask(sequences: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, T] int64: 1 wherever the token is not the pad token (prompt and response)."""
    return (sequences != pad_token_id).long()


def action_mask(sequences: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, T-1]: the attention mask of the token each shifted position scores."""
    return attention_mask(sequences, pad_token_id)[:, 1:]


def response_loss_mask(sequences: torch.Tensor, prompt_len: int, pad_token_id: int):
    """[B, N]: the mask the actor and critic losses use (the action mask from `start` on):
    1 on the non-pad response tokens."""
    return action_mask(sequences, pad_token_id)[:, prompt_len - 1:]


def valid_response_tokens(sequences: torch.Tensor, prompt_len: int, pad_token_id: int):
    """[B]: the number of non-pad response tokens of each row."""
    return (sequences[:, prompt_len:] != pad_token_id).sum(1)


def ends(sequences: torch.Tensor, prompt_len: int, pad_token_id: int) -> torch.Tensor:
    """[B] exclusive end, in shifted coordinates, of the span that holds rewards and values:
    start + (number of non-pad response tokens) + 1. Its last position, ends - 1, is where the
    score goes; it can be one past the last shifted position (a response that fills N), in
    which case the span is cut at the end of the row."""
    start = prompt_len - 1
    return start + action_mask(sequences, pad_token_id)[:, start:].sum(1) + 1


def score_position(sequences: torch.Tensor, prompt_len: int, pad_token_id: int):
    """[B] response column (0..N-1) that receives the score: the column after the last non-pad
    response token, or the last column when the response has no pad."""
    n = sequences.shape[1] - prompt_len
    return (ends(sequences, prompt_len, pad_token_id) - 1 - (prompt_len - 1)).clamp(max=n - 1)


# -------------------------------------------------------------------------------- rewards

def rewards(sequences, prompt_len: int, pad_token_id: int, logprobs, ref_logprobs, scores, *,
            kl_ctl: float = 0.1, clip_reward_value: float = 5.0) -> torch.Tensor:
    """[B, T-1] float64 per-token rewards: -kl_ctl * (logp - ref_logp) at EVERY shifted
    position (prompt and padding too), plus the clipped score at the last position of the span
    [start, ends) (see `ends`). Nothing is masked here."""
    out = -kl_ctl * (logprobs.to(F64) - ref_logprobs.to(F64))
    clipped = scores.to(F64).clamp(-clip_reward_value, clip_reward_value)
    start, stop = prompt_len - 1, ends(sequences, prompt_len, pad_token_id)
    last = out.shape[1] - 1
    for row in range(out.shape[0]):
        # the last position of out[row, start:stop]; python slicing cuts stop at the row end
        position = min(int(stop[row]), last + 1) - 1
        if position >= start:
            out[row, position] += clipped[row]
    return out


def zero_after_end(rewards_, values, sequences, prompt_len: int, pad_token_id: int):
    """Copies of rewards and values [B, T-1] with every position >= ends set to 0; the
    position ends - 1 (the score's) keeps its KL term and its value."""
    stop = ends(sequences, prompt_len, pad_token_id)
    positions = torch.arange(rewards_.shape[1], device=rewards_.device)
    keep = positions[None, :] < stop[:, None]
    return (torch.where(keep, rewards_.to(F64), 0.0), torch.where(keep, values.to(F64), 0.0))


def gae(values, rewards_, start: int, *, gamma: float = 1.0, lam: float = 0.95):
    """GAE over shifted positions start .. T-2 with no mask (the caller zeroes what lies past
    the end); the value after the last position is 0. Returns (advantages, returns) [B, N]
    float64, returns = advantages + values."""
    values, rewards_ = values.to(F64), rewards_.to(F64)
    length = rewards_.shape[1]
    running = torch.zeros(rewards_.shape[0], dtype=F64, device=rewards_.device)
    columns = []
    for t in range(length - 1, start - 1, -1):
        following = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        running = rewards_[:, t] + gamma * following - values[:, t] + gamma * lam * running
        columns.append(running)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, advantages + values[:, start:]


def advantages_and_returns(sequences, prompt_len: int, pad_token_id: int, logprobs,
                           ref_logprobs, values, scores, *, kl_ctl=0.1, clip_reward_value=5.0,
                           gamma=1.0, lam=0.95):
    """The whole chain on shifted [B, T-1] inputs: rewards, zeroing past the end, GAE.
    Returns (rewards [B, T-1] after zeroing, advantages [B, N], returns [B, N],
    loss mask [B, N])."""
    r = rewards(sequences, prompt_len, pad_token_id, logprobs, ref_logprobs, scores,
                kl_ctl=kl_ctl, clip_reward_value=clip_reward_value)
    r, v = zero_after_end(r, values, sequences, prompt_len, pad_token_id)
    adv, ret = gae(v, r, prompt_len - 1, gamma=gamma, lam=lam)
    return r, adv, ret, response_loss_mask(sequences, prompt_len, pad_token_id)


def to_shifted(response_tensor: torch.Tensor, prompt_len: int, fill=0.0) -> torch.Tensor:
    """Place a [B, N] per-response-token tensor at shifted positions start .. T-2 of a
    [B, T-1] tensor (prompt positions hold `fill`)."""
    b, n = response_tensor.shape
    out = torch.full((b, prompt_len - 1 + n), fill, dtype=F64, device=response_tensor.device)
    out[:, prompt_len - 1:] = response_tensor.to(F64)
    return out


# ------------------------------------------------------------------------- rollout filter

def keep_rows(sequences, prompt_len: int, pad_token_id: int) -> torch.Tensor:
    """[B] bool: rollouts with more than one non-pad response token are kept."""
    return valid_response_tokens(sequences, prompt_len, pad_token_id) > 1


class RolloutFilter:
    """Drops the short rollouts of each generated batch; when none is left, the last batch that
    had any is used again (its prompts and sequences)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id, self.last = pad_token_id, None

    def __call__(self, prompts, sequences):
        keep = keep_rows(sequences, prompts.shape[1], self.pad_token_id)
        if not bool(keep.any()):
            if self.last is None:
                raise RuntimeError("no rollout long enough and no earlier batch to reuse")
            return self.last
        # only the sequences are filtered; the prompt tensor stays whole (only its width, P,
        # is read afterwards)
        self.last = (prompts, sequences[keep])
        return self.last


# -------------------------------------------------------------------- forwards and losses

def shifted_logprobs(model, sequences, pad_token_id: int) -> torch.Tensor:
    """[B, T-1] log-probs of tokens 1..T-1 from a forward of `model` (no temperature), with
    the pad mask as attention mask: how the old (and reference) log-probs are obtained."""
    logits = model(input_ids=sequences,
                   attention_mask=attention_mask(sequences, pad_token_id)).logits
    logp = F.log_softmax(logits[:, :-1].to(F64), dim=-1)
    return logp.gather(-1, sequences[:, 1:, None]).squeeze(-1)


def actor_loss(logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2):
    """Clipped surrogate on [B, N] response columns, mean over the masked tokens."""
    mask = mask.to(F64)
    ratio = torch.exp((logprobs.to(F64) - old_logprobs.to(F64)) * mask)
    adv = advantages.to(F64)
    worst = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    return (worst * mask).sum() / mask.sum()


def ptx_loss(model, input_ids, attention_mask_, labels) -> torch.Tensor:
    """The causal-LM loss of a pretraining batch, as a Hugging Face model computes it from
    `labels` (mean next-token cross-entropy over the targets != -100), here in float64 (the
    model's own loss upcasts to float32 only)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask_).logits
    return F.cross_entropy(logits[:, :-1].to(F64).flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)


def actor_accumulation_steps(gradient_accumulation_steps: int, ptx: bool) -> int:
    """The actor engine's gradient-accumulation steps: doubled when pretraining mixing is on
    (its DeepSpeed config's train_batch_size is micro batch x world size x this, and DeepSpeed
    derives its accumulation steps from that), so that the PPO and the pretraining backward of
    each minibatch fall into one accumulation window."""
    return gradient_accumulation_steps * (2 if ptx else 1)


def ppo_then_ptx_steps(engine, ppo_loss_fn, ptx_loss_fn, ptx_coef: float):
    """The actor's update with pretraining mixing: backward of the PPO loss and engine.step(),
    then the pretraining loss times ptx_coef, its own backward and engine.step(). With the
    engine's accumulation doubled (`actor_accumulation_steps`) the first step() is not an
    accumulation boundary: both gradients, each scaled by 1 / accumulation steps, are summed
    and the optimizer steps once, after the second. Returns (ppo loss, ptx loss)."""
    loss = ppo_loss_fn()
    engine.backward(loss)
    engine.step()
    ptx = ptx_loss_fn()
    engine.backward(ptx_coef * ptx)
    engine.step()
    return loss.detach(), ptx.detach()


# --------------------------------------------------------------------------- model paths

def reward_model_init(base_model: str, sft_model: str | None = None) -> str:
    """Step 2 starts from the base pretrained model given to it, whatever step 1 produced."""
    return base_model
