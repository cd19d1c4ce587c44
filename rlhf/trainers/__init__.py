"""The three steps of the trainer (sft, reward, rl), their evaluation, checkpoints, logging."""
