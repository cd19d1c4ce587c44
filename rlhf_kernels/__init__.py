"""rlhf_kernels: fused CPU / CUDA / Triton kernels for the hot spots of RLHF training.

Every op with kernels takes backend="auto" | "cuda" | "triton" | "cpu" | "torch" (not
ppo_critic_loss: elementwise torch on every device); see `python -m rlhf_kernels report` for
what is available here.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._backends import BackendUnavailable
from .ops import (PPOActorOutput, PPOCriticOutput, decode_attention, fused_linear_logprobs,
                  fused_linear_ppo_actor_loss, gae, logprobs, ppo_actor_loss, ppo_critic_loss,
                  sample)
from .reference.sample import NonFiniteLogitsError

__version__ = "0.1.0"
__all__ = ["gae", "logprobs", "decode_attention", "sample", "ppo_actor_loss", "ppo_critic_loss",
           "fused_linear_logprobs", "fused_linear_ppo_actor_loss", "PPOActorOutput",
           "PPOCriticOutput", "BackendUnavailable", "NonFiniteLogitsError", "__version__"]
