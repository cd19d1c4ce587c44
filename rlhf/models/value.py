"""Value models (reward model of step 2, critic of step 3): an LM backbone plus a scalar head."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from rlhf.models.export import full_state_dict, write_on_main_process
from rlhf.models.fused_forward import fused_hidden
from rlhf.models.loading import enable_gradient_checkpointing
from rlhf_kernels.generation import position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


def head_input_size(config) -> int:
    """Width of the backbone's last hidden state (OPT projects it to word_embed_proj_dim)."""
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        size = getattr(config, name, None)
        if isinstance(size, int) and size > 0:
            return size
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}")


def last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B], has_token [B] bool) of a [B, T] 0/1 mask (an attention mask, an action
    mask; padding left, right or both): the position of the last nonzero entry of each row,
    and whether the row has one (index 0 where it has none)."""
    if mask.dim() != 2:
        raise ValueError(f"the mask must be [B, T], got shape {tuple(mask.shape)}")
    mask = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1)
    return last.clamp(min=0), last >= 0


class PairwiseOutput(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> PairwiseOutput:
    """Bradley-Terry loss mean(-logsigmoid(chosen - rejected)) and the fraction chosen > rejected.

    The loss is computed in float32 and stays differentiable; the accuracy is detached.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"chosen_scores and rejected_scores must be [B] of the same shape, got "
                         f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}")
    if chosen_scores.numel() == 0:
        raise ValueError("chosen_scores is empty")
    margin = chosen_scores.float() - rejected_scores.float()
    loss = -F.logsigmoid(margin).mean()
    return PairwiseOutput(loss, (margin.detach() > 0).float().mean())


class ValueModel(nn.Module):
    """A causal LM's backbone (no LM head) and `v_head`: Linear(hidden, 1, bias=False).

    Args:
        backbone: the base model (e.g. `LlamaModel`), returning `last_hidden_state`.
        gradient_checkpointing: recompute the backbone's activations in backward.
    """

    def __init__(self, backbone: PreTrainedModel, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.backbone = backbone
        first = next(backbone.parameters())
        self.v_head = nn.Linear(head_input_size(backbone.config), 1, bias=False,
                                dtype=first.dtype, device=first.device)
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel, *, gradient_checkpointing: bool = False) -> ValueModel:
        """A value model on `model`'s backbone (shared, not copied) with a new, random head."""
        backbone = model.base_model
        if backbone is model:
            raise ValueError(f"{type(model).__name__} has no separate base model to use as a backbone")
        return cls(backbone, gradient_checkpointing=gradient_checkpointing)

    def gradient_checkpointing_enable(self) -> None:
        enable_gradient_checkpointing(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, T] in float32, one per position; those of padding positions are
        unspecified (the fused path and HF attend from them differently) and go unused.

        Position ids default to counting real tokens only (`position_ids_from_mask`), so left
        padding does not shift the positions of a row.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = fused_hidden(self.backbone, input_ids, attention_mask, position_ids)
        if hidden is None:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False).last_hidden_state
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()

    @staticmethod
    def score_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value at each row's last real token: [B, T] -> [B]."""
        if values.shape != attention_mask.shape:
            raise ValueError(f"values shape {tuple(values.shape)} != attention_mask shape "
                             f"{tuple(attention_mask.shape)}")
        index, has_token = last_token_index(attention_mask)
        if not bool(has_token.all()):
            raise ValueError("attention_mask has a row without any real token")
        return values.gather(1, index.unsqueeze(1)).squeeze(1)

    def save(self, output_dir: str | Path, tokenizer=None) -> None:
        """Writes the backbone (`save_pretrained` folder) and `value_head.safetensors`.

        LoRA adapters are merged in and ZeRO-3 parameters gathered first; collective, rank 0 writes.
        """
        state = full_state_dict(self)
        output_dir = Path(output_dir)
        prefix = "backbone."
        backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        def write():
            output_dir.mkdir(parents=True, exist_ok=True)
            self.backbone.save_pretrained(output_dir, state_dict=backbone_state)
            save_file({"weight": state["v_head.weight"].contiguous()}, str(output_dir / VALUE_HEAD_FILE))
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)

        write_on_main_process(write)

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
             gradient_checkpointing: bool = False) -> ValueModel:
        """Loads a value model written by `save` (the head must be there)."""
        head_file = Path(model_dir) / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file} not found: {model_dir} is not a saved value model "
                                    "(start one from a causal LM with ValueModel.from_causal_lm)")
        model = cls(AutoModel.from_pretrained(str(model_dir), dtype=dtype),
                    gradient_checkpointing=gradient_checkpointing)
        weight = load_file(str(head_file))["weight"]
        if weight.shape != model.v_head.weight.shape:
            raise ValueError(f"value head in {head_file} has shape {tuple(weight.shape)}, expected "
                             f"{tuple(model.v_head.weight.shape)}")
        with torch.no_grad():
            model.v_head.weight.copy_(weight)
        return model.eval()
