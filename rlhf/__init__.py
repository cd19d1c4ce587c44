"""rlhf: the DeepSpeed RLHF trainer (SFT -> reward model -> PPO); see the README for status."""
