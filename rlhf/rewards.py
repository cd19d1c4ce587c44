"""Reward functions: Python callables `fn(prompts, responses) -> list[float]` named "module:function".

They stand beside reward models in step 3 (rule-based or programmatic rewards, e.g. the demo's
known preference rule).

A spec is code: `--rl.reward my_reward:score` (or `rl: {reward: ...}` in a YAML file) imports
and runs the module `my_reward`. It is looked up on sys.path with the current working folder
first, as under `python -m`, so a `my_reward.py` beside the config is found when `rlhf` runs from
that folder. The folder is on sys.path only while the module (and what it imports at its top)
is imported: a folder's `datasets.py` or `utils.py` cannot shadow a library later in the run.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@contextlib.contextmanager
def _cwd_importable():
    """The current working folder at the front of sys.path for the duration, as `python -m`
    puts it there (the `rlhf` console script's sys.path does not hold it)."""
    cwd = os.getcwd()
    here = any(p in ("", cwd) for p in sys.path)
    if not here:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written after the folder was last listed
    try:
        yield
    finally:
        if not here and cwd in sys.path:
            sys.path.remove(cwd)


def load_reward_fn(spec: str) -> RewardFn:
    """Imports the callable named by `spec`, written "package.module:function".

    The part after ':' may be a dotted path inside the module ("module:Class.method").

    The module is imported with the current working folder at the front of sys.path (see the
    module docstring): `rlhf` run from a folder finds the `my_reward.py` in it.

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
        with _cwd_importable():
            target = importlib.import_module(module_name)
    except Exception as err:
        where, missing = "", getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and f"{module_name}.".startswith(f"{missing}."):
            where = f" (searched the current folder {os.getcwd()} and sys.path)"
        raise ValueError(f"cannot import module {module_name!r} of reward function {spec!r}: "
                         f"{type(err).__name__}: {err}{where}") from err
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


def _call_within(timeout: float | None, fn: RewardFn, *args):
    """fn(*args), or TimeoutError after `timeout` seconds. The call runs in a daemon thread (a
    Python call cannot be interrupted from outside): past the deadline the run stops with the
    error and the thread dies with the process. Grad mode follows the caller's."""
    if not timeout:
        return fn(*args)
    box: dict = {}
    grad = torch.is_grad_enabled()

    def call():
        try:
            with torch.set_grad_enabled(grad):
                box["result"] = fn(*args)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=call, name=f"reward {_fn_name(fn)}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"reward function {_fn_name(fn)} did not return within {timeout:g} s "
                           f"(rl.reward_timeout; 0 = no limit)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def score_with_fn(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], *,
                  timeout: float | None = None) -> torch.Tensor:
    """Calls `fn(prompts, responses)` and checks its answer.

    Args:
        timeout: seconds the call may take (None or 0: no limit).

    Returns:
        The scores as a float32 CPU tensor [B].

    Raises:
        ValueError: prompts and responses differ in length, or the result is not a sequence of
            len(prompts) finite real numbers (a list, tuple, 1-D tensor or array).
        TimeoutError: the call took longer than `timeout`.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    result = _call_within(timeout, fn, list(prompts), list(responses))
    scores = _as_float_list(result, len(prompts), _fn_name(fn))
    return torch.tensor(scores, dtype=torch.float32)
