"""The config tree as typed leaves: dotted keys, coercion of YAML / CLI text to each field's
type, and help strings. Generic over any tree of dataclasses; rlhf.config holds the run's."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def leaf_types(cls) -> dict[str, Any]:
    """{"rl.kl_ctl": float, "seed": int, ...} for every leaf field of the dataclass tree."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update({f"{name}.{k}": v for k, v in leaf_types(hint).items()})
        else:
            out[name] = hint
    return out


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` (from YAML, a dict or a CLI string) as type `hint`, or a TypeError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[T]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        items = [s.strip() for s in value.split(",") if s.strip()] \
            if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"config key {key!r}: expected a list, got {value!r}")
        return [coerce(item, args[0], key) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
    elif hint in (int, float):
        if isinstance(value, bool):
            pass
        elif isinstance(value, int) or (isinstance(value, float) and
                                        (hint is float or value.is_integer())):
            return hint(value)
        elif isinstance(value, str):  # CLI text; PyYAML also reads "1e-5" (no dot) as a string
            try:
                return hint(value.strip())
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"config key {key!r}: unsupported field type {hint!r}")
    raise TypeError(f"config key {key!r}: expected {hint.__name__}, got {value!r}")


def flatten(tree: dict, cls, prefix: str = "") -> dict[str, Any]:
    """Nested / dotted dict -> {"section.field": value}; unknown keys raise ValueError."""
    hints = typing.get_type_hints(cls)
    flat = {}
    for key, value in tree.items():
        head, _, rest = str(key).partition(".")
        where = f"{prefix}{head}"
        if head not in hints:
            close = difflib.get_close_matches(head, hints, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {where!r}{hint}; valid keys"
                             f"{' in ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(hints)}")
        sub = hints[head]
        if dataclasses.is_dataclass(sub):
            if rest:
                value = {rest: value}
            elif not isinstance(value, dict):
                raise TypeError(f"config key {where!r} is a section: expected a mapping, "
                                f"got {value!r}")
            flat.update(flatten(value, sub, where + "."))
        elif rest:
            raise ValueError(f"unknown config key {prefix + str(key)!r}: "
                             f"{where!r} is not a section")
        else:
            flat[where] = value
    return flat


def apply(cfg, flat: dict[str, Any]) -> None:
    types_ = leaf_types(type(cfg))
    for key, value in flat.items():
        *path, leaf = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, coerce(value, types_[key], key))


def leaf_help(obj, prefix: str = "") -> dict[str, str]:
    """{"rl.kl_ctl": "help (default 0.1)", ...} from a default instance (rm's defaults differ)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaf_help(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f"{f.metadata.get('help', '')} (default {value!r})"
    return out


def close_key(key: str, keys) -> str | None:
    """The known dotted key nearest to an unknown one (a typo, or the right field under the
    wrong section: "ppo.kl_ctl" -> "rl.kl_ctl"), or None."""
    keys = list(keys)
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}  # the first key of each leaf
    close = difflib.get_close_matches(leaf, leaves, n=1)
    return leaves[close[0]] if close else None
