"""The patching mechanism shared by the integrations: replace, record, restore, report.

A `Target` names one function of a third-party package (`module` + `qualname`, which may be
`Class.method`) and how to build its replacement from the original. `Patcher.patch()`
replaces the function where it is defined and every other reference to the same object
inside the package: module globals (copies made by `from x import f`) and entries of
module-level dicts (registries such as veRL's `ADV_ESTIMATOR_REGISTRY`). `unpatch()` puts
the original objects back wherever the replacement is found, including modules imported
while the patch was active. Nothing here imports the package before `patch()` is called.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("rlhf_kernels.integrations")


@dataclasses.dataclass(frozen=True)
class Target:
    """One attribute to replace.

    Attributes:
        module: dotted module name, e.g. "trl.trainer.utils".
        qualname: attribute path inside the module, e.g. "selective_log_softmax" or
            "RemoteExperienceMaker.get_advantages_and_returns".
        op: what now does the work, for the report, e.g. "rlhf_kernels.logprobs".
        make: original -> replacement. The replacement must keep the original's signature
            and call the original for inputs it does not handle.
    """
    module: str
    qualname: str
    op: str
    make: Callable[[Any], Any]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


def wraps(original: Callable) -> Callable[[Callable], Callable]:
    """functools.wraps (name, doc, `__wrapped__` = the original) without copying the
    original's __dict__: torch.compile'd originals keep their compiler state there."""
    return functools.wraps(original, updated=())


def _import(module: str, package: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or "a dependency"
        raise ImportError(
            f"patching {package} needs the package '{package}' and its dependencies "
            f"(`pip install {pip_name}`): importing {module} failed because {missing!r} "
            f"could not be imported ({e})") from e


def _current(owner: Any, attr: str) -> Any:
    # a class's own __dict__ gives the plain function, not a bound method or an inherited one
    return vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)


def _resolve(root: Any, qualname: str) -> Tuple[Any, str, Any]:
    """(owner, attribute name, current value); raises AttributeError / KeyError when absent."""
    *path, name = qualname.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    return owner, name, _current(owner, name)


def _package_modules(prefix: str) -> List[types.ModuleType]:
    return [m for name, m in list(sys.modules.items()) if isinstance(m, types.ModuleType)
            and (name == prefix or name.startswith(prefix + "."))]


def swap_references(prefix: str, old: Any, new: Any) -> List[str]:
    """Replace `old` by `new` in the globals and the module-level dicts of every imported
    module of the package `prefix`; returns where ("module.name", "module.REGISTRY[key]")."""
    where = []
    for module in _package_modules(prefix):
        namespace = vars(module)  # never getattr: lazy modules would import on access
        for key, value in list(namespace.items()):
            if value is old:
                namespace[key] = new
                where.append(f"{module.__name__}.{key}")
            elif type(value) is dict:
                for k, v in list(value.items()):
                    if v is old:
                        value[k] = new
                        where.append(f"{module.__name__}.{key}[{k!r}]")
    return where


class Patcher:
    """The patch state of one package; see the module docstring.

    Args:
        package: top-level import name, e.g. "trl"; only its modules are scanned.
        targets: what to replace.
        pip_name: what to `pip install` when the package is missing (in the error).
    """

    def __init__(self, package: str, targets: Sequence[Target], pip_name: Optional[str] = None):
        self.package = package
        self.targets = tuple(targets)
        self.pip_name = pip_name or package
        self._active: Dict[str, Tuple[Any, str, Any, Any]] = {}  # name -> owner, attr, orig, new
        self._report: List[str] = []

    @property
    def is_patched(self) -> bool:
        return bool(self._active)

    def patch(self) -> List[str]:
        """Replace every target; returns (and logs) "where -> op" lines. Idempotent."""
        if self._active:  # already on: only catch references made since (none expected)
            for _, _, original, new in self._active.values():
                swap_references(self.package, original, new)
            return list(self._report)
        roots = {t.module: _import(t.module, self.package, self.pip_name) for t in self.targets}
        resolved = []
        for target in self.targets:  # resolve everything before changing anything
            try:
                resolved.append((target, *_resolve(roots[target.module], target.qualname)))
            except (AttributeError, KeyError):
                logger.warning("%s: not found in this version of %s, left alone", target.name,
                               self.package)
        for target, owner, attr, original in resolved:
            new = target.make(original)
            setattr(owner, attr, new)
            self._active[target.name] = (owner, attr, original, new)
            lines = [target.name] + [w for w in swap_references(self.package, original, new)
                                     if w != target.name]
            self._report += [f"{where} -> {target.op}" for where in lines]
        logger.info("rlhf_kernels patched %s:\n  %s", self.package, "\n  ".join(self._report))
        return list(self._report)

    def unpatch(self) -> List[str]:
        """Restore the original objects; returns the names of the targets restored."""
        restored = []
        for name, (owner, attr, original, new) in reversed(list(self._active.items())):
            try:
                mine = _current(owner, attr) is new
            except (AttributeError, KeyError):
                mine = False
            if mine:
                setattr(owner, attr, original)
            else:
                logger.warning("%s was replaced again by someone else since patch(); "
                               "only the copies of the rlhf_kernels version are restored", name)
            swap_references(self.package, new, original)
            restored.append(name)
        self._active.clear()
        self._report = []
        return restored
