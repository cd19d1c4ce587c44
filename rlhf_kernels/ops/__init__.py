"""Argument checks, backend dispatch and autograd Functions, one module per op."""
from .decode import decode_attention, sample
from .fused_linear import fused_linear_logprobs, fused_linear_ppo_actor_loss
from .gae import gae
from .logprobs import logprobs
from .ppo_loss import PPOActorOutput, PPOCriticOutput, ppo_actor_loss, ppo_critic_loss

# op name -> backends it has (the report iterates this). The PPO losses and the fused-linear
# ops run on the logprobs kernels; the critic loss is elementwise torch on every device.
OPS = {
    "gae": ("cuda", "triton", "cpu", "torch"),
    "logprobs": ("cuda", "triton", "cpu", "torch"),
    "decode_attention": ("cuda", "triton", "cpu", "torch"),
    "sample": ("cuda", "triton", "cpu", "torch"),
    # the decoder-layer ops of the generation adapters' forwards: CPU kernels; GPUs run torch's
    "rms_norm": ("cpu", "torch"),
    "rope": ("cpu", "torch"),
    "swiglu": ("cpu", "torch"),
}

__all__ = ["gae", "logprobs", "decode_attention", "sample", "ppo_actor_loss", "ppo_critic_loss", "fused_linear_logprobs",
           "fused_linear_ppo_actor_loss", "PPOActorOutput", "PPOCriticOutput", "OPS"]
