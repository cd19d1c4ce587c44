"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 (RMSNorm, RoPE with the config's scaling,
GQA / MQA, SwiGLU, optional q/k/v biases, q/k norms, sliding windows, tied embeddings)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...reference.rms_norm import rms_norm
from ...reference.rope import rope_tables, rotate
from .attention import DecodeAttention
from .base import (DecoderAdapter, Unsupported, cpu_attention_kernel, decode_layer_kernel,
                   fused_swiglu, linear)


def _weights(layer):
    """One decoder layer's tensors, read where they are (no copy)."""
    attention, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attention, "q_norm", None)
    w = SimpleNamespace(
        q=linear(attention.q_proj), k=linear(attention.k_proj), v=linear(attention.v_proj),
        o=linear(attention.o_proj), gate=linear(mlp.gate_proj), up=linear(mlp.up_proj),
        down=linear(mlp.down_proj), input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        eps=layer.input_layernorm.variance_epsilon,
        q_norm=None if q_norm is None else q_norm.weight,
        k_norm=None if q_norm is None else attention.k_norm.weight,
        qk_eps=None if q_norm is None else q_norm.variance_epsilon)
    # the same tensors as the decode-layer kernel takes them (csrc/decode_layer.h)
    projections = (w.q, w.k, w.v, w.o, w.gate, w.up, w.down)
    w.weights, w.biases = [p[0] for p in projections], [p[1] for p in projections]
    w.norms = [w.input_norm, w.post_norm] + ([] if q_norm is None else [w.q_norm, w.k_norm])
    return w


class LlamaAdapter(DecoderAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, model):
        config = model.config
        inner = getattr(model, "model", model)  # a causal LM, or its base model (value models)
        self.num_layers = len(inner.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        super().__init__(model)
        self.blocks = [_weights(layer) for layer in inner.layers]
        attention = inner.layers[0].self_attn
        self.scale = float(getattr(attention, "scaling", self.head_dim ** -0.5))
        if getattr(config, "pretraining_tp", 1) > 1:
            raise Unsupported("pretraining_tp > 1")
        self.embed_tokens, self.norm = inner.embed_tokens, inner.norm
        self.lm_head = getattr(model, "lm_head", None)
        self.rotary = inner.rotary_emb
        rope_type = getattr(self.rotary, "rope_type", "default")
        self.graph_safe = "dynamic" not in str(rope_type)  # dynamic NTK resizes with host syncs
        self.act = (F.silu if config.hidden_act == "silu" else inner.layers[0].mlp.act_fn)
        self.gated = self.act_times_up
        self.position_tables = None  # [max length, D] cos and signed sin, for decode steps
        self.windows = self._sliding_windows(config)

    def _sliding_windows(self, config):
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if not window:
            return [None] * self.num_layers
        if layer_types:
            return [window if kind == "sliding_attention" else None for kind in layer_types]
        if config.model_type == "mistral":
            return [window] * self.num_layers
        if getattr(config, "use_sliding_window", False):
            first_full = getattr(config, "max_window_layers", self.num_layers)
            return [window if i >= first_full else None for i in range(self.num_layers)]
        return [None] * self.num_layers

    def act_times_up(self, gate, up):
        return self.act(gate) * up

    def use_kernels(self, backend: str, grad: bool = False) -> None:
        super().use_kernels(backend, grad)
        swiglu = fused_swiglu(backend, self.device, self.dtype, grad) if self.act is F.silu \
            else None
        self.gated = swiglu or self.act_times_up
        # a decode step's layer in one call when every op of the block runs our CPU kernel
        self.decode_layer = decode_layer_kernel() if (
            swiglu is not None and not grad and self.linear is not F.linear
            and self.rotate is not rotate and self.rms_norm is not rms_norm) else None

    def embed(self, ids, positions):
        return F.embedding(ids, self.embed_tokens.weight)

    def prepare(self, positions, like):
        if self.position_tables is not None:  # a decode step: two lookups
            cos, sin = self.position_tables
            return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
        return rope_tables(*self.rotary(like, positions))  # with the config's scaling

    def tabulate_positions(self, length: int) -> None:
        """The RoPE tables of positions 0 .. length-1 from HF's rotary module, once: each
        entry is inv_freq * position (one product, no sum), its cos and sin, the same bits
        as computing it per step. Not for dynamic rope types, whose tables depend on the
        sequence length."""
        if not self.graph_safe:
            return
        positions = torch.arange(length, device=self.device)[None]
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = rope_tables(*self.rotary(like, positions))
        self.position_tables = cos[0, :, 0], sin[0, :, 0]  # [length, D]

    def block(self, index, w, h, shape, tables, attend):
        cos, sin = tables
        if self.decode_layer is not None and isinstance(attend, DecodeAttention) \
                and attend.kernel is cpu_attention_kernel():
            k_cache, v_cache, lengths, start = attend.inputs(index)
            return self.decode_layer(h, w.norms, w.weights, w.biases, w.eps, w.qk_eps or 0.0,
                                     self.heads, self.kv_heads, cos, sin, k_cache, v_cache,
                                     lengths, start, self.scale)
        x = self.rms_norm(h, w.input_norm, w.eps)
        q = self.linear(x, *w.q).view(*shape, self.heads, self.head_dim)
        k = self.linear(x, *w.k).view(*shape, self.kv_heads, self.head_dim)
        v = self.linear(x, *w.v).view(*shape, self.kv_heads, self.head_dim)
        if w.q_norm is not None:
            q, k = self.rms_norm(q, w.q_norm, w.qk_eps), self.rms_norm(k, w.k_norm, w.qk_eps)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        h = h + self.linear(attend(index, q, k, v, self.scale).flatten(0, 1), *w.o)
        x = self.rms_norm(h, w.post_norm, w.eps)
        gate, up = self.linear(x, *w.gate), self.linear(x, *w.up)
        return h + self.linear(self.gated(gate, up), *w.down)

    def final_norm(self, h):
        return self.rms_norm(h, self.norm.weight, self.norm.variance_epsilon)

    def head(self, h):
        if self.lm_head is None:
            raise Unsupported("a base model has no LM head")
        return self.linear(self.final_norm(h), *linear(self.lm_head))
