"""The PPO actor loss as trainers compute it today (TRL / OpenRLHF / DeepSpeed-Chat style):
upcast the logits to float32, log_softmax, gather, entropy from a second softmax, the PPO
math in torch, autograd keeping the [B, T, V] intermediates. Written for this benchmark."""
import torch


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def baseline_actor_loss(logits, labels, old_logprobs, advantages, mask, ref_logprobs,
                        kl_coef=0.1, entropy_coef=0.01, clip=0.2):
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    ratio = torch.exp(logp - old_logprobs)
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    log_r = ref_logprobs - logp
    kl = torch.exp(log_r) - log_r - 1
    maskf = mask.float()
    return masked_mean(pg + kl_coef * kl - entropy_coef * entropy, maskf)


def baseline_linear_actor_loss(hidden, weight, labels, old_logprobs, advantages, mask,
                               ref_logprobs, **kw):
    """Unfused LM head: the full [B, T, V] logits, then the loss above."""
    return baseline_actor_loss(hidden @ weight.t(), labels, old_logprobs, advantages, mask,
                               ref_logprobs, **kw)
