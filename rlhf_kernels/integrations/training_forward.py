"""Our CPU layer kernels inside Hugging Face's own forwards of Llama-family models: the
forwards a trainer runs on HF modules (TRL's policy forward and backward, with or without
gradient checkpointing; reference and old-policy forwards).

    from rlhf_kernels.integrations.transformers import apply_rlhf_training_kernels
    apply_rlhf_training_kernels(model)    # this instance's modules; returns the model
    remove_rlhf_training_kernels(model)   # HF's forwards back

Each served module of the model gets an instance `forward` (its class and other instances are
untouched): an RMSNorm runs `rlhf_kernels.ops.rms_norm` (eps read from the module at each
call); a SiLU-gated MLP runs down(swiglu(gate(x), up(x))), the projections called as modules
(LoRA layers and hooks included); an attention module runs HF's own forward, inside which the
modeling module's `apply_rotary_pos_emb` serves it through `rlhf_kernels.ops.rope` (that
module function becomes a pass-through to HF's for every other caller, while a patched model
exists). HF's gradient checkpointing recomputes a decoder layer by calling its forward again,
which calls these same instance forwards: the recompute runs the kernels too. The ops run our
float32 CPU kernels, and their torch reference (HF's rounding) on other dtypes and devices;
values and gradients equal HF's to float32 rounding (tests/test_training_forward.py).
An input embedding whose weight the LM head shares runs rlhf_kernels.ops.tied_embedding: the
same lookup, whose gradient is added into that of our fused LM head (trl.patch()) in place
instead of in a second [V, H] tensor (the peak of a TRL step's memory).

Exact or declined: a module is served only when its class is the installed transformers' own
class of a family below, with that class's own forward (not one a hub kernel or another patch
put there), and what we run agrees with that forward on a random input (checked once per
class); an MLP only with a SiLU activation; RMSNorm not under autocast (HF's chain of ops
there); nothing of a ZeRO-3-partitioned model. Everything else keeps HF's forward, with one
log line per reason. (A whole served module pickled, e.g. torch.save(model), does not load
back: remove the kernels first; state dicts, save_pretrained and deepcopy are unaffected.)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import types
import weakref

import torch

from ..generation import SUPPORTED_MODEL_TYPES
from ..ops import tied_embedding
from ..ops.rms_norm import rms_norm
from ..ops.rope import rotate
from ..ops.swiglu import swiglu
from ..reference.rope import rope_tables
from . import prefix_sharing

log = logging.getLogger("rlhf_kernels.integrations")

# model_type -> the class-name prefix in transformers.models.<type>.modeling_<type>. The other
# families the generation adapters cover have none of these layers (LayerNorm, learned
# positions, GELU / ReLU MLPs).
LAYER_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
NO_LAYER_OPS = ("gpt2", "opt")
KINDS = {"RMSNorm": "norm", "MLP": "mlp", "Attention": "attention", "Model": "model"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ROPE_FUNCTION = "apply_rotary_pos_emb"
PROBE_TOLERANCE = 1e-4  # of the output's scale: rounding is ~1e-7, a different formula O(1)
_said = set()
_probed = {}  # class -> None (agrees) or the reason it does not
_rope_users = {}  # modeling module name -> WeakSet of attention modules served by its dispatcher
# the RoPE tables of the model whose attention forward is running (None: HF's rope)
_active_tables = contextvars.ContextVar("rlhf_kernels_rope_tables", default=None)


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("apply_rlhf_training_kernels: %s", reason)


# -- the served forwards (bound to each instance with types.MethodType: deepcopy rebinds) ---

def _norm_forward(self, hidden_states):
    if torch.is_autocast_enabled(hidden_states.device.type):
        _say_once("autocast is on: RMSNorm runs HF's forward (its ops under autocast's rules)")
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    plan = prefix_sharing.mlp_plan(self, x)
    if plan is not None:  # the tokens its batch repeats computed once (prefix_sharing.py)
        packed = plan.pack(x)
        return plan.unpack(self.down_proj(swiglu(self.gate_proj(packed), self.up_proj(packed))))
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _embedding_forward(self, input):
    return tied_embedding.embedding(input, self.weight, self.padding_idx)


def _attention_forward(self, *args, **kwargs):
    modeling = sys.modules[type(self).__module__]
    if not _install_dispatcher(modeling):
        return type(self).forward(self, *args, **kwargs)
    _rope_users[modeling.__name__].add(self)  # a deep copy of a patched model registers here
    given = _bind(type(self), self, args, kwargs)
    plan = None if given is None else prefix_sharing.attention_plan(
        given.get("hidden_states"), given.get("position_embeddings"))
    token, packing = _active_tables.set(self._rlhf_kernels_rope), \
        prefix_sharing.enter_attention(plan)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        prefix_sharing.leave_attention(packing)
        _active_tables.reset(token)


def _bind(cls, module, args, kwargs):
    """{parameter: value} of a call of cls.forward, or None when it does not bind."""
    try:
        return prefix_sharing.signature(cls).bind(module, *args, **kwargs).arguments
    except TypeError:
        return None


SERVED_FORWARDS = {"norm": _norm_forward, "mlp": _mlp_forward, "attention": _attention_forward,
                   "tied embedding": _embedding_forward, "model": prefix_sharing.model_forward,
                   "projection": prefix_sharing.projection_forward}


# -- RoPE: HF's module function, served for patched attention modules --------------------------

class RopeTables:
    """The rope op's [B, T, 1, D] tables for the cos / sin [1 or B, T, D] that HF's rotary
    module made last: every layer of a forward, and a checkpointed layer's recompute, passes
    the same tensors, so they are built once per forward."""

    def __init__(self):
        self.last = None

    def get(self, cos, sin, batch: int):
        last = self.last
        if last is not None and last[0] is cos and last[1] is sin and last[2] == batch:
            return last[3], last[4]
        cos4, sin4 = rope_tables(cos, sin)
        if cos4.shape[0] != batch:  # position ids shared by the rows
            cos4, sin4 = (t.expand(batch, *t.shape[1:]).contiguous() for t in (cos4, sin4))
        self.last = (cos, sin, batch, cos4, sin4)
        return cos4, sin4


def _rope_serves(q, k, cos, sin, unsqueeze_dim) -> bool:
    """HF's layout: q, k [B, heads, T, D]; cos, sin [B or 1, T, D] unsqueezed at dim 1."""
    return (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
            and sin.shape == cos.shape and q.shape[0] == k.shape[0]
            and cos.shape[0] in (1, q.shape[0]) and q.shape[2] == k.shape[2] == cos.shape[1]
            and q.shape[3] == k.shape[3] == cos.shape[2] and cos.shape[2] % 2 == 0)


def _rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        tables = _active_tables.get()
        if tables is None or not _rope_serves(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos4, sin4 = tables.get(cos, sin, q.shape[0])
        # [B, heads, T, D] -> the op's [B, T, heads, D]: a view for HF's projections' layout
        return (rotate(q.transpose(1, 2), cos4, sin4).transpose(1, 2),
                rotate(k.transpose(1, 2), cos4, sin4).transpose(1, 2))
    apply_rotary_pos_emb.rlhf_kernels_original = original
    return apply_rotary_pos_emb


def _hf_rope_function(modeling):
    """HF's own apply_rotary_pos_emb of a modeling module (behind our dispatcher, if one is
    there), or None when what the module holds is something else (another patch)."""
    current = getattr(modeling, ROPE_FUNCTION, None)
    current = getattr(current, "rlhf_kernels_original", current)
    if getattr(current, "__module__", None) != modeling.__name__ \
            or getattr(current, "__qualname__", None) != ROPE_FUNCTION:
        return None
    names = list(inspect.signature(current).parameters)
    return current if names == ["q", "k", "cos", "sin", "unsqueeze_dim"] else None


def _install_dispatcher(modeling) -> bool:
    current = getattr(modeling, ROPE_FUNCTION, None)
    if hasattr(current, "rlhf_kernels_original"):
        return True
    original = _hf_rope_function(modeling)
    if original is None:
        _say_once(f"{modeling.__name__}.{ROPE_FUNCTION} is not HF's (replaced by another "
                  f"patch?): RoPE runs it")
        return False
    setattr(modeling, ROPE_FUNCTION, _rope_dispatcher(original))
    _rope_users.setdefault(modeling.__name__, weakref.WeakSet())
    return True


def _restore_unused_dispatchers() -> None:
    for name, users in _rope_users.items():
        modeling = sys.modules.get(name)
        current = getattr(modeling, ROPE_FUNCTION, None)
        if not any(_served_kind(m) == "attention" for m in list(users)) \
                and hasattr(current, "rlhf_kernels_original"):
            setattr(modeling, ROPE_FUNCTION, current.rlhf_kernels_original)


# -- which modules are served ------------------------------------------------------------------

def _kind(module):
    """'norm', 'mlp' or 'attention' for a module of a served family's own class, else None."""
    cls = type(module)
    for model_type, prefix in LAYER_FAMILIES.items():
        if model_type in SUPPORTED_MODEL_TYPES and cls.__name__.startswith(prefix) \
                and cls.__module__ == f"transformers.models.{model_type}.modeling_{model_type}":
            return KINDS.get(cls.__name__[len(prefix):])
    return None


def _served_kind(module):
    """The kind of the forward this instance runs of ours, or None."""
    func = getattr(module.__dict__.get("forward"), "__func__", None)
    return next((kind for kind, served in SERVED_FORWARDS.items() if func is served), None)


def _own_forward(cls) -> bool:
    forward = cls.__dict__.get("forward")
    return forward is not None and inspect.unwrap(forward).__module__ == cls.__module__


def _check_norm(module):
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
            or not isinstance(eps, (int, float)):
        return "no 1-D weight and float variance_epsilon"
    return None


def _check_mlp(module):
    from transformers.activations import SiLUActivation
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return "no gate_proj, up_proj and down_proj"
    act = getattr(module, "act_fn", None)
    if type(act) not in (SiLUActivation, torch.nn.SiLU) or "forward" in act.__dict__ \
            or not _own_forward(type(act)):
        return f"its activation {type(act).__name__} is not SiLU"
    return None


def _check_attention(module):
    modeling = sys.modules[type(module).__module__]
    if ROPE_FUNCTION not in inspect.unwrap(type(module).forward).__code__.co_names:
        return f"its forward does not call {ROPE_FUNCTION}"
    if _hf_rope_function(modeling) is None:
        return f"{modeling.__name__}.{ROPE_FUNCTION} is not HF's (replaced by another patch?)"
    return None


# -- the probe: what we run against the class's forward, once per class --------------------------

def _random(generator, shape, like):
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _compare(ours, hf, what):
    for got, want in zip(ours, hf):
        scale = max(1.0, want.abs().max().item())
        gap = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
        if not gap <= PROBE_TOLERANCE * scale:  # NaN too
            return f"{what} differs from HF's forward on a random input"
    return None


def _probe_norm(module, generator):
    x = _random(generator, (2, 3, module.weight.shape[0]), module.weight)
    return _compare([_norm_forward(module, x)], [type(module).forward(module, x)], "RMSNorm")


def _probe_mlp(module, generator):
    x = _random(generator, (2, 3, module.gate_proj.weight.shape[1]), module.gate_proj.weight)
    return _compare([_mlp_forward(module, x)], [type(module).forward(module, x)], "the MLP")


def _probe_rope(module, generator):
    original = _hf_rope_function(sys.modules[type(module).__module__])
    like, dim = module.q_proj.weight, module.head_dim
    q, k = _random(generator, (2, 4, 3, dim), like), _random(generator, (2, 2, 3, dim), like)
    angles = _random(generator, (1, 3, dim // 2), like) * 3
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    token = _active_tables.set(RopeTables())
    try:
        ours = _rope_dispatcher(original)(q, k, cos, sin)
    finally:
        _active_tables.reset(token)
    return _compare(ours, original(q, k, cos, sin), "RoPE")


CHECKS = {"norm": (_check_norm, _probe_norm), "mlp": (_check_mlp, _probe_mlp),
          "attention": (_check_attention, _probe_rope),
          "model": (lambda module: None, lambda module, generator: None)}  # HF's forward runs


@contextlib.contextmanager
def _evaluating(module):
    """Dropout off (a LoRA layer's) while the probe runs: both forwards then compute the same
    thing, and neither draws from the global random state."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _why_not(module, kind):
    """None when the module is served exactly, else the reason."""
    if not _own_forward(type(module)):
        return "its class's forward is not HF's own (a hub kernel or another patch?)"
    if "forward" in module.__dict__:
        return "this instance's forward is replaced already"
    check, probe = CHECKS[kind]
    reason = check(module)
    if reason is None and type(module) not in _probed:
        try:
            with torch.no_grad(), _evaluating(module):
                _probed[type(module)] = probe(module, torch.Generator().manual_seed(0))
        except Exception as err:  # a probe that cannot run (meta weights, ...) serves nothing
            _probed[type(module)] = f"the check against HF's forward failed ({err})"
    return reason or _probed.get(type(module))


def _tied_embedding(model):
    """(the input embedding, None) of the causal LM in `model` when its LM head shares the
    weight and the embedding is served exactly; (None, reason) when such an embedding is not
    served; (None, None) when there is no tied input embedding."""
    lm = next((m for m in model.modules() if callable(getattr(m, "get_output_embeddings", None))
               and getattr(getattr(m, "config", None), "model_type", None) in LAYER_FAMILIES),
              None)
    head = lm.get_output_embeddings() if lm is not None else None
    embedding = lm.get_input_embeddings() if head is not None else None
    if embedding is None or getattr(embedding, "weight", None) is not head.weight:
        return None, None
    if type(embedding) is not torch.nn.Embedding or "forward" in embedding.__dict__:
        return None, (f"the tied input embedding ({type(embedding).__name__}) is not torch's own "
                      f"nn.Embedding with its own forward")
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None, "the tied input embedding uses max_norm, scale_grad_by_freq or sparse"
    return embedding, None


# -- the public functions ----------------------------------------------------------------------

def _serve(module, kind, tables) -> None:
    if kind == "attention":
        module._rlhf_kernels_rope = tables
        modeling = sys.modules[type(module).__module__]
        _install_dispatcher(modeling)
        _rope_users[modeling.__name__].add(module)
    module.forward = types.MethodType(SERVED_FORWARDS[kind], module)


def _serve_projections(attention) -> int:
    """The attention's q / k / v / o projections pack the tokens a batch repeats (those of
    torch's or peft's Linear, whose forward is their class's own): how many are served."""
    served = 0
    for name in PROJECTIONS:
        projection = getattr(attention, name, None)
        if projection is None or not prefix_sharing.per_token(projection):
            continue
        if _served_kind(projection) is None and "forward" not in projection.__dict__:
            projection.forward = types.MethodType(prefix_sharing.projection_forward, projection)
        served += _served_kind(projection) == "projection"
    return served


def apply_rlhf_training_kernels(model):
    """Serves the RMSNorm, SiLU-gated MLP and RoPE-attention modules of `model` (an HF model,
    a peft model or any module holding one) with our layer kernels, each one whose math we
    reproduce exactly; the others keep HF's forward, with one log line per reason. Returns the
    model. Calling it again serves modules added since; the served ones stay as they are."""
    first = next(model.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):
        _say_once("ZeRO-3-partitioned weights are not served; forwards left as they are")
        return model
    tables, served = RopeTables(), {}
    for module in model.modules():
        kind = _kind(module)
        if kind is None:
            continue
        if _served_kind(module) is None:
            reason = _why_not(module, kind)
            if reason is not None:
                _say_once(f"{type(module).__name__} keeps HF's forward: {reason}")
                continue
            _serve(module, kind, tables)
        served[kind] = served.get(kind, 0) + 1
        if kind == "attention":
            served["projection"] = served.get("projection", 0) + _serve_projections(module)
    if served:  # a model with layers we serve: its tied embedding too (module docstring)
        embedding, reason = _tied_embedding(model)
        if reason is not None:
            _say_once(f"keeps torch's embedding backward: {reason}")
        if embedding is not None:
            if _served_kind(embedding) is None:
                embedding.forward = types.MethodType(_embedding_forward, embedding)
            served["tied embedding"] = 1
    if not served:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        _say_once(f"{type(model).__name__} (model_type {model_type!r}): no RMSNorm, SiLU MLP "
                  f"or RoPE attention of {', '.join(LAYER_FAMILIES)} to serve; left as it is")
    else:
        log.info("apply_rlhf_training_kernels: %s: %s", type(model).__name__,
                 ", ".join(f"{n} {kind}" for kind, n in served.items()))
    return model


def remove_rlhf_training_kernels(model):
    """HF's forwards back on every module of `model`; returns the model."""
    for module in model.modules():
        if _served_kind(module) is not None:
            del module.forward
            module.__dict__.pop("_rlhf_kernels_rope", None)
    _restore_unused_dispatchers()
    return model
