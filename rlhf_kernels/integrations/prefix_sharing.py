"""Shared prefixes computed once in the forwards of served models (apply_rlhf_training_kernels).

A GRPO / RLOO batch holds each prompt several times (TRL: `num_generations` completions per
prompt), and a causal model computes the same thing for every copy of a prompt: at position t
a row's hidden states depend only on its tokens, mask and positions up to t. So the tokens of
a row whose prefix through t equals an earlier row's are not computed again; the
position-wise work of a decoder layer (the attention's q / k / v / o projections and the MLP,
which hold nearly all of the FLOPs) runs on the distinct tokens only, packed as [N, H]:

    rows  p p p p c c c      (p: the prompt, identical in rows 0-3; c: each row's completion)
          p p p p c c c      packed: row 0's 4 prompt tokens + every row's 3 completion tokens
          p p p p c c c      = 4 + 4 * 3 = 16 of 28 tokens
          p p p p c c c

Everything else keeps HF's [B, T] layout: the residual stream, the norms, RoPE and the
attention itself (the packed projections are unpacked to [B, T] before it, so every row's
queries see their own keys and masks). Values are those of the full computation: copies take
the very bits of their first copy. Parameter gradients are the full computation's too (the
function of the weights is the same; the unpacking's backward sums each token's copies), but
the gradient with respect to an intermediate activation of a copy is carried by its first
copy: forwards whose activations a caller could differentiate or watch run every row in full
(output_hidden_states / output_attentions, backward hooks anywhere in the model).

The plan (which token is whose copy) comes from the model's inputs: input ids, attention mask
and position ids compared row against row. It is built when a served base model's forward
starts, and reaches the decoder layers' recomputes (gradient checkpointing replays a layer
during backward, outside that forward) on the RoPE tables every layer is passed. Before each
packing the copies are checked to hold their first copy's bits: a hook that changes values
per row, an eager attention whose fully masked (left-pad) queries average the whole row, a
per-row adapter, all make the copies differ, and from there on the layer runs in full.
A forward that is not a plain one over token ids (inputs_embeds, a filled KV cache, a 4-D
mask, keyword arguments we do not know) or with less than MIN_SHARED of its tokens repeated,
and a module with hooks inside (what they would see changes) run unpacked, as HF does. So do
a model in a dtype other than float32 or under autocast (the copies' gradients, summed before
a GEMM, would round unlike HF's sum inside it) and a model with an active dropout (in HF each
copy of a prompt draws its own mask: the copies differ from the first layer on).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import logging

import torch

log = logging.getLogger("rlhf_kernels.integrations")
_said = set()

MIN_SHARED = 0.1  # of the batch's tokens: below it, the gathers cost more than they save
PLAN_ATTRIBUTE = "_rlhf_kernels_prefix_plan"  # on the cos table of a forward's RoPE pair
# the base model's keyword arguments whose values are the same for every row (or None)
ROW_INDEPENDENT = {"use_cache", "return_dict", "cache_position"}
# returned intermediates: a caller could differentiate with respect to them (module docstring)
INTERMEDIATES = ("output_attentions", "output_hidden_states")

_model_plan = contextvars.ContextVar("rlhf_kernels_model_plan", default=None)
# (plan, {id(input): packed}) while a served attention forward runs: its projections pack
_projecting = contextvars.ContextVar("rlhf_kernels_projecting", default=None)
# the plan of the attention that ran last, for the MLP of the same decoder layer (taken once)
_layer_plan = contextvars.ContextVar("rlhf_kernels_layer_plan", default=None)


class PrefixPlan:
    """Which of a [B, T] batch's tokens are computed: `pack_index` [N] (flat indices of the
    first copies), `unpack_index` [B * T] (each token's first copy, in packed rows) and
    `copies`: (flat start, packed start, length) runs of the repeated tokens (`repeated`)."""

    def __init__(self, batch, length, pack_index, unpack_index, repeated):
        self.batch, self.length = batch, length
        self.pack_index, self.unpack_index = pack_index, unpack_index
        self.repeated, self.repeated_first = repeated, unpack_index.index_select(0, repeated)
        self.copies = _runs(repeated.tolist(), self.repeated_first.tolist())

    @property
    def tokens(self) -> int:
        return self.pack_index.numel()

    def fits(self, x) -> bool:
        """x is [B, T, ...] of this batch (a packed [N, H] never is: HF's tensors are 3-D)."""
        return x.dim() >= 3 and x.shape[0] == self.batch and x.shape[1] == self.length

    def pack(self, x):
        """[B, T, ...] -> [N, ...], the first copy of every token."""
        return _Pack.apply(x.reshape(self.batch * self.length, *x.shape[2:]), self)

    def unpack(self, y):
        """[N, ...] -> [B, T, ...]: every token takes its first copy's values."""
        return _Unpack.apply(y, self).view(self.batch, self.length, *y.shape[1:])

    def describes(self, x) -> bool:
        """Whether the repeated tokens of x [B, T, ...] equal their first copies bit for bit
        (what every layer input of a planned forward holds)."""
        flat = x.detach().reshape(self.batch * self.length, -1)  # records nothing to save
        return bool(torch.equal(flat.index_select(0, self.repeated),
                                flat.index_select(0, self.pack_index)
                                .index_select(0, self.repeated_first)))


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan, ctx.rows = plan, x.shape[0]
        return x.index_select(0, plan.pack_index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # the repeated tokens feed nothing packed: their gradient here is 0
        full = grad.new_zeros(ctx.rows, *grad.shape[1:])
        return full.index_copy_(0, ctx.plan.pack_index, grad), None


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, plan):
        ctx.plan = plan
        return y.index_select(0, plan.unpack_index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        plan = ctx.plan  # grad: [B * T, ...]
        packed = grad.index_select(0, plan.pack_index)
        for flat, first, n in plan.copies:  # contiguous runs: a few slice adds per batch
            packed[first:first + n] += grad[flat:flat + n]
        return packed, None


def build_plan(input_ids, attention_mask=None, position_ids=None):
    """The plan of a [B, T] batch, or None when less than MIN_SHARED of its tokens repeat."""
    rows, length = input_ids.shape
    device = input_ids.device
    keys = [k.expand(rows, length) for k in (input_ids, attention_mask, position_ids)
            if k is not None]
    positions = torch.arange(length, device=device)
    first = torch.empty(rows, length, dtype=torch.long, device=device)
    for b in range(rows):  # [B, T] at a time: no [B, B, T] tensor for large batches
        differs = torch.zeros(rows, length, dtype=torch.bool, device=device)
        for key in keys:
            differs |= key != key[b]
        # the length of the prefix row c shares with row b
        shared = torch.where(differs.any(1), differs.to(torch.uint8).argmax(1), length)
        # the first row sharing row b's prefix through t (row b itself at the latest)
        first[b] = (shared[:, None] > positions).to(torch.uint8).argmax(0)
    computed = (first == torch.arange(rows, device=device)[:, None]).flatten()
    tokens = int(computed.sum())
    if tokens > (1 - MIN_SHARED) * rows * length:
        return None
    packed_row = computed.cumsum(0) - 1
    unpack_index = packed_row[(first * length + positions).flatten()]
    return PrefixPlan(rows, length, computed.nonzero().squeeze(1), unpack_index,
                      (~computed).nonzero().squeeze(1))


def _runs(flat, first):
    """(flat start, first start, length) of the runs where both indices count up by one."""
    runs = []
    for f, p in zip(flat, first):
        if runs and runs[-1][0] + runs[-1][2] == f and runs[-1][1] + runs[-1][2] == p:
            runs[-1][2] += 1
        else:
            runs.append([f, p, 1])
    return [tuple(run) for run in runs]


# -- where the plan comes from and goes ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def signature(cls):
    return inspect.signature(cls.forward)


def plan_for_model(model, args, kwargs):
    """(plan or None, the reason when this forward is not one we plan) for a base model's
    forward(*args, **kwargs)."""
    try:
        bound = signature(type(model)).bind(model, *args, **kwargs)
    except TypeError:
        return None, None  # HF's forward says what is wrong
    given = dict(bound.arguments)
    given.pop("self", None)
    given.update(given.pop("kwargs", {}))
    ids, mask = given.pop("input_ids", None), given.pop("attention_mask", None)
    positions = given.pop("position_ids", None)
    for name in ("cache", "past_key_values"):
        cache = given.pop(name, None)
        if cache is not None and (not hasattr(cache, "get_seq_length")
                                  or cache.get_seq_length() != 0):
            return None, "a filled KV cache"
    if given.pop("inputs_embeds", None) is not None:
        return None, "inputs_embeds instead of token ids"
    if any(given.pop(name, None) for name in INTERMEDIATES):
        return None, "intermediate outputs asked for (output_hidden_states / _attentions)"
    unknown = sorted(name for name, value in given.items()
                     if value is not None and name not in ROW_INDEPENDENT)
    if unknown:
        return None, f"keyword arguments {unknown}"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 2:
        return None, None  # one row or no ids: nothing to share
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 \
            or torch.is_autocast_enabled(ids.device.type):
        return None, ("a dtype other than float32 (sums of the copies' gradients would round "
                      "unlike HF's)")
    reason = _rows_apart(model)
    if reason is not None:
        return None, reason
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None, "an attention mask that is not [batch, length]"
    if positions is not None and (not isinstance(positions, torch.Tensor)
                                  or positions.dim() != 2 or positions.shape[1] != ids.shape[1]
                                  or positions.shape[0] not in (1, ids.shape[0])):
        return None, "position ids that are not [batch or 1, length]"
    return build_plan(ids, mask, positions), None


NO_PLAN = "no plan"  # a served model's forward is running, unplanned
_CONFLICT = "conflict"  # a cos table seen by two forwards: neither is packed through it


def model_forward(self, *args, **kwargs):
    """A served base model's forward (LlamaModel, ...): HF's, under the plan of its inputs."""
    plan, reason = plan_for_model(self, args, kwargs)
    if reason is not None and reason not in _said:
        _said.add(reason)
        log.info("shared prefixes: a forward with %s runs every row in full", reason)
    token = _model_plan.set(NO_PLAN if plan is None else plan)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _model_plan.reset(token)


def per_token(module) -> bool:
    """torch's Linear or peft's LoRA Linear: what a projection computes for a token depends on
    that token only (a quantizer with per-tensor activation scales would not qualify)."""
    cls = type(module)
    if cls is torch.nn.Linear:
        return True
    return cls.__name__ == "Linear" and cls.__module__.startswith("peft.tuners.lora") \
        and per_token(getattr(module, "base_layer", None))


def attention_plan(hidden_states, position_embeddings):
    """The plan of the forward this attention call is part of, or None. In the model's forward
    the model's plan, then kept on the forward's cos table; in a gradient-checkpointing
    recompute (outside that forward) the cos table's. (Every packing checks that the plan
    describes its input: projection_forward, mlp_plan.)"""
    pair = position_embeddings
    cos = pair[0] if isinstance(pair, (tuple, list)) and pair \
        and isinstance(pair[0], torch.Tensor) else None
    if cos is None:
        return None
    tagged, running = getattr(cos, PLAN_ATTRIBUTE, None), _model_plan.get()
    if running is not None:  # the forward pass
        if tagged is not None and tagged is not running:  # a table reused across forwards
            setattr(cos, PLAN_ATTRIBUTE, _CONFLICT)
            return None
        if running is NO_PLAN:
            return None
        setattr(cos, PLAN_ATTRIBUTE, running)
        return running if running.fits(hidden_states) else None
    return tagged if isinstance(tagged, PrefixPlan) and tagged.fits(hidden_states) else None


def enter_attention(plan):
    """Context for a served attention forward under `plan` (or None): its projections run
    packed, and the MLP of its layer takes the plan. Returns a token for `leave_attention`."""
    _layer_plan.set(plan)
    return None if plan is None else _projecting.set((plan, {}))


def leave_attention(token):
    if token is not None:
        _projecting.reset(token)


_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks") + _BACKWARD_HOOKS
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _rows_apart(model):
    """Why the copies' results would differ from HF's (dropout draws per row, backward hooks
    would see the copies' gradients on the first copy), or None: one walk over the modules."""
    modules = torch.nn.modules.module
    hooked = any(getattr(modules, "_global" + name, None) for name in _BACKWARD_HOOKS)
    for m in model.modules():
        if _draws(m):
            return "an active dropout (each row draws its own: copies of a prompt differ)"
        hooked = hooked or any(getattr(m, name, None) for name in _BACKWARD_HOOKS)
    return "backward hooks (they would see the copies' gradients on the first copy)" \
        if hooked else None


def _draws(module) -> bool:
    """A dropout that draws in this forward: a dropout module, or an attention's dropout
    (HF passes `attention_dropout` to its attention function in training)."""
    if not module.training:
        return False
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return module.p > 0
    rate = getattr(module, "attention_dropout", 0)
    return isinstance(rate, (int, float)) and rate > 0


def _quiet_inside(module) -> bool:
    """What runs inside module's forward has no hooks (they would see packed tensors; its own
    hooks run around our forward, on HF's [B, T, ...] tensors) and draws nothing (a dropout
    there would draw for the packed layout: a forward with one is not planned, but the
    model's modules can change between the plan and the layer)."""
    modules = torch.nn.modules.module
    if any(getattr(modules, name, None) for name in _GLOBAL_HOOKS):
        return False
    return not any((m is not module and any(getattr(m, name, None) for name in _HOOKS))
                   or _draws(m) for m in module.modules())


def projection_forward(self, *args, **kwargs):
    """A served attention's projection: packed inside an attention forward that has a plan."""
    state = _projecting.get()
    original = type(self).forward
    if state is None or kwargs or len(args) != 1 or not state[0].fits(args[0]) \
            or not _quiet_inside(self):
        return original(self, *args, **kwargs)
    plan, packed = state
    x = args[0]
    key = (id(x), None if x.is_inference() else x._version)  # x is held: its id stays its own
    if key not in packed:  # q, k and v take the same input: checked and packed once
        packed.clear()
        packed[key] = (x, plan.pack(x) if plan.describes(x) else None)
    if packed[key][1] is None:
        return original(self, x)
    return plan.unpack(original(self, packed[key][1]))


def mlp_plan(mlp, x):
    """The plan for a served MLP's input x: the one its layer's attention just took, when it
    describes x (so a plan never reaches an MLP called some other way) and nothing inside the
    MLP would see the packing."""
    plan = _layer_plan.get()
    if plan is None:
        return None
    _layer_plan.set(None)
    if not plan.fits(x) or not _quiet_inside(mlp) \
            or not all(per_token(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return plan if plan.describes(x) else None
