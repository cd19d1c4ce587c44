"""Argument checks and the torch.library custom ops (rlhf_kernels::*), one module per op;
backends are chosen in rlhf_kernels._backends."""
from .. import _backends
from .decode import decode_attention, sample
from .fused_linear import fused_linear_logprobs, fused_linear_ppo_actor_loss
from .gae import gae
from .logprobs import logprobs
from .ppo_loss import PPOActorOutput, PPOCriticOutput, ppo_actor_loss, ppo_critic_loss

# op name -> backends it has (the report and the self-test iterate this), from the one table.
# The PPO losses and the fused-linear ops run on the logprobs kernels; the critic loss is
# elementwise torch on every device; skinny_linear is the adapters' decode-step projection,
# no public op.
OPS = {op: tuple(b for b in _backends.BACKENDS if b in backends)
       for op, backends in _backends.TABLE.items() if op != "skinny_linear"}

__all__ = ["gae", "logprobs", "decode_attention", "sample", "ppo_actor_loss", "ppo_critic_loss", "fused_linear_logprobs",
           "fused_linear_ppo_actor_loss", "PPOActorOutput", "PPOCriticOutput", "OPS"]
