"""Models of the trainer: causal LMs (actor, reference), value models (reward, critic), LoRA."""
from rlhf.models.export import full_state_dict, save_pretrained_merged, unwrap
from rlhf.models.loading import enable_gradient_checkpointing, load_causal_lm, load_tokenizer, smollm2_gguf
from rlhf.models.lora import apply_lora, has_lora, lora_state_dict, merge_lora
from rlhf.models.tiny import load_tiny, random_causal_lm, tiny_config, train_tokenizer
from rlhf.models.value import (
    PairwiseOutput,
    ValueModel,
    last_token_index,
    pairwise_loss,
    position_ids_from_mask,
)

__all__ = [
    "PairwiseOutput", "ValueModel", "apply_lora", "enable_gradient_checkpointing", "full_state_dict",
    "has_lora", "last_token_index", "load_causal_lm", "load_tiny", "load_tokenizer",
    "lora_state_dict", "merge_lora", "pairwise_loss", "position_ids_from_mask", "random_causal_lm",
    "save_pretrained_merged", "smollm2_gguf", "tiny_config", "train_tokenizer", "unwrap",
]
