"""GPT-2: learned positions, pre-LayerNorm blocks, fused QKV in Conv1D layout ([in, out])."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import DecoderAdapter, Unsupported, layer_norm, linear


def conv1d(x, module):
    weight, bias = linear(module)
    flat = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return flat.view(*x.shape[:-1], -1)


class GPT2Adapter(DecoderAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def __init__(self, model):
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise Unsupported("cross-attention layers")
        inner = model.transformer
        self.blocks = list(inner.h)
        self.num_layers = len(self.blocks)
        self.heads = self.kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        super().__init__(model)
        self.inner, self.lm_head = inner, model.lm_head
        self.max_positions = config.n_positions
        base = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
        self.scales = [base / (i + 1) if by_layer else base for i in range(self.num_layers)]

    def embed(self, ids, positions):
        return F.embedding(ids, self.inner.wte.weight) + F.embedding(positions,
                                                                     self.inner.wpe.weight)

    def block(self, index, layer, h, shape, tables, attend):
        q, k, v = conv1d(layer_norm(h, layer.ln_1), layer.attn.c_attn).split(h.shape[-1], -1)
        shape = (*shape, self.heads, self.head_dim)
        out = attend(index, q.view(shape), k.view(shape), v.view(shape), self.scales[index])
        h = h + conv1d(out.flatten(0, 1), layer.attn.c_proj)
        mlp = layer.mlp
        return h + conv1d(mlp.act(conv1d(layer_norm(h, layer.ln_2), mlp.c_fc)), mlp.c_proj)

    def head(self, h):
        weight, bias = linear(self.lm_head)
        return F.linear(layer_norm(h, self.inner.ln_f), weight, bias)
