"""Reward functions: Python callables `fn(prompts, responses) -> list[float]` named "module:function".

They stand beside reward models in step 3 (rule-based or programmatic rewards, e.g. the demo's
known preference rule).
"""
from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Imports the callable named by `spec`, written "package.module:function".

    The part after ':' may be a dotted path inside the module ("module:Class.method").

    Raises:
        ValueError: the spec is malformed, the module cannot be imported, the attribute is
            missing, or it is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function spec must look like 'module:function', got {spec!r}")
    module_name, attr_path = (part.strip() for part in spec.split(":"))
    if not module_name or not attr_path:
        raise ValueError(f"reward function spec must look like 'module:function', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(f"cannot import module {module_name!r} of reward function {spec!r}: "
                         f"{type(err).__name__}: {err}") from err
    for name in attr_path.split("."):
        if not hasattr(target, name):
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} "
                             f"(reward function {spec!r})")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"reward function {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _fn_name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}" if module else name


def _as_float_list(result, expected: int, who: str) -> list[float]:
    if isinstance(result, torch.Tensor):
        if result.dim() != 1:
            raise ValueError(f"reward function {who} returned a tensor of shape {tuple(result.shape)}, "
                             f"expected [{expected}]")
        result = result.detach().cpu().tolist()
    elif hasattr(result, "tolist") and not isinstance(result, (str, bytes)):  # numpy arrays
        result = result.tolist()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        raise ValueError(f"reward function {who} must return a sequence of {expected} numbers, "
                         f"got {type(result).__name__}")
    if len(result) != expected:
        raise ValueError(f"reward function {who} returned {len(result)} scores for {expected} responses")
    scores = []
    for i, value in enumerate(result):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"reward function {who} returned a non-number at index {i}: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"reward function {who} returned a non-finite score at index {i}: {value!r}")
        scores.append(float(value))
    return scores


def score_with_fn(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Calls `fn(prompts, responses)` and checks its answer.

    Returns:
        The scores as a float32 CPU tensor [B].

    Raises:
        ValueError: prompts and responses differ in length, or the result is not a sequence of
            len(prompts) finite real numbers (a list, tuple, 1-D tensor or array).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    result = fn(list(prompts), list(responses))
    scores = _as_float_list(result, len(prompts), _fn_name(fn))
    return torch.tensor(scores, dtype=torch.float32)
