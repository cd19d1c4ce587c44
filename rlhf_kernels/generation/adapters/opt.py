"""OPT: learned positions (offset 2), pre- or post-LayerNorm blocks, optional input / output
projections around the decoder (word_embed_proj_dim != hidden_size)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import DecoderAdapter, dense, layer_norm

POSITION_OFFSET = 2  # OPT's learned position table is shifted by two rows


class OPTAdapter(DecoderAdapter):
    family = "opt"
    model_types = ("opt",)

    def __init__(self, model):
        config = model.config
        decoder = model.model.decoder
        self.blocks = list(decoder.layers)
        self.num_layers = len(self.blocks)
        self.heads = self.kv_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        super().__init__(model)
        self.decoder, self.lm_head = decoder, model.lm_head
        self.max_positions = config.max_position_embeddings
        self.pre_norm = config.do_layer_norm_before
        self.q_scale = self.head_dim ** -0.5   # OPT scales q before the product, like HF

    def embed(self, ids, positions):
        h = F.embedding(ids, self.decoder.embed_tokens.weight)
        if self.decoder.project_in is not None:
            h = dense(h, self.decoder.project_in)
        table = self.decoder.embed_positions.weight
        return h + F.embedding(positions + POSITION_OFFSET, table)

    def block(self, index, layer, h, shape, tables, attend):
        attention = layer.self_attn
        x = layer_norm(h, layer.self_attn_layer_norm) if self.pre_norm else h
        project = self.linear
        q = dense(x, attention.q_proj, project) * self.q_scale
        shape = (*shape, self.heads, self.head_dim)
        k = dense(x, attention.k_proj, project).view(shape)
        v = dense(x, attention.v_proj, project).view(shape)
        out = attend(index, q.view(shape), k, v, 1.0).flatten(0, 1)
        h = h + dense(out, attention.out_proj, project)
        if not self.pre_norm:
            h = layer_norm(h, layer.self_attn_layer_norm)
        x = layer_norm(h, layer.final_layer_norm) if self.pre_norm else h
        h = h + dense(layer.activation_fn(dense(x, layer.fc1, project)), layer.fc2, project)
        return h if self.pre_norm else layer_norm(h, layer.final_layer_norm)

    def head(self, h):
        if self.decoder.final_layer_norm is not None:
            h = layer_norm(h, self.decoder.final_layer_norm)
        if self.decoder.project_out is not None:
            h = dense(h, self.decoder.project_out)
        return dense(h, self.lm_head, self.linear)
