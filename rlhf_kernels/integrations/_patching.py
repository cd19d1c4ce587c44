"""The patching mechanism shared by the integrations: replace, record, restore, report.

A `Target` names one function of a third-party package (`module` + `qualname`, which may be
`Class.method`) and how to build its replacement from the original. `Patcher.patch()`
replaces the function where it is defined and every other reference to the same object
inside the package: module globals (copies made by `from x import f`) and entries of
module-level dicts (registries such as veRL's `ADV_ESTIMATOR_REGISTRY`). `unpatch()` puts
the original objects back wherever the replacement is found, including modules imported
while the patch was active. Nothing here imports the package before `patch()` is called.

Each target is imported and patched on its own: a target whose module does not import, that
is absent, whose shape is not what its replacement expects (`Decline`), or, outside the
package versions the integration is tested on, whose signature differs from the recorded one,
is skipped; `Patcher.skipped` says which and why (also logged as a warning).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
import re
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
            and call the original for inputs it does not handle. It raises `Decline` when
            the original is not of the shape it was written for.
        signature: the parameters of the replaced function as written in a `def` (with
            `self` / `ctx`; for a class, those of its `forward`), e.g. "logits, index,
            temperature=1.0"; checked (names and kinds) outside the tested versions.
    """
    module: str
    qualname: str
    op: str
    make: Callable[[Any], Any]
    signature: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


class Decline(Exception):
    """Raised by `Target.make`: the original is not what the replacement was written for."""


def parameters(obj: Any) -> Optional[Tuple[Tuple[str, str], ...]]:
    """(name, kind) of each parameter of a function, or of a class's `forward`; None when
    there is no signature to read."""
    fn = getattr(obj, "forward", None) if isinstance(obj, type) else obj
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    try:
        return tuple((p.name, p.kind.name) for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def expected_parameters(spec: str) -> Tuple[Tuple[str, str], ...]:
    """(name, kind) of the parameters a `def f(<spec>)` would have: names and the markers
    `/`, `*`, `*args`, `**kwargs`; defaults are not compared (and hold no comma here)."""
    out, kind = [], "POSITIONAL_OR_KEYWORD"
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name = part.split("=")[0].split(":")[0].strip()
        if name == "/":
            out = [(n, "POSITIONAL_ONLY") for n, _ in out]
        elif name == "*":
            kind = "KEYWORD_ONLY"
        elif name.startswith("**"):
            out.append((name[2:], "VAR_KEYWORD"))
        elif name.startswith("*"):
            out.append((name[1:], "VAR_POSITIONAL"))
            kind = "KEYWORD_ONLY"
        else:
            out.append((name, kind))
    return tuple(out)


def describe(params: Optional[Tuple[Tuple[str, str], ...]]) -> str:
    """`parameters()` as a def would write them (no defaults): "(self, x, *, flag)"."""
    if params is None:
        return "(unreadable)"
    out, keyword_only = [], False
    for i, (name, kind) in enumerate(params):
        if kind == "VAR_POSITIONAL":
            out.append(f"*{name}")
            keyword_only = True
        elif kind == "VAR_KEYWORD":
            out.append(f"**{name}")
        else:
            if kind == "KEYWORD_ONLY" and not keyword_only:
                out.append("*")
                keyword_only = True
            out.append(name)
        if kind == "POSITIONAL_ONLY" and (i + 1 == len(params)
                                          or params[i + 1][1] != "POSITIONAL_ONLY"):
            out.append("/")
    return f"({', '.join(out)})"


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def in_range(version: Optional[str], spec: str) -> bool:
    """`version` within a spec like ">=1.16,<1.17" (numeric release parts only); False when
    the version is unknown."""
    if not version or not re.match(r"\d", version):
        return False
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
           ">": lambda a, b: a > b, "==": lambda a, b: a == b}
    v = _version_tuple(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = re.match(r"[<>=]+", clause).group(0)
        bound = _version_tuple(clause[len(op):])
        if not ops[op](v[:len(bound)] + (0,) * (len(bound) - len(v)), bound):
            return False
    return True


def installed_version(package: str, pip_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:  # a source checkout: ask the module
        return getattr(sys.modules.get(package), "__version__", None)


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
        tested: the versions the replacements are tested on, e.g. ">=1.16,<1.17"; outside
            them (or when the version is unknown) a target is patched only if its signature
            is the recorded one.
    """

    def __init__(self, package: str, targets: Sequence[Target], pip_name: Optional[str] = None,
                 tested: Optional[str] = None):
        self.package = package
        self.targets = tuple(targets)
        self.pip_name = pip_name or package
        self.tested = tested
        self._active: Dict[str, Tuple[Any, str, Any, Any]] = {}  # name -> owner, attr, orig, new
        self._report: List[str] = []
        self._skipped: List[str] = []

    @property
    def is_patched(self) -> bool:
        return bool(self._active)

    @property
    def replaced(self) -> Dict[str, Tuple[Any, Any]]:
        """{target name: (original, replacement)} of what is patched now."""
        return {name: (original, new) for name, (_, _, original, new) in self._active.items()}

    @property
    def skipped(self) -> List[str]:
        """"target: why" for each target the last patch() left alone."""
        return list(self._skipped)

    def _skip(self, target: Target, why: str) -> None:
        self._skipped.append(f"{target.name}: {why}")
        logger.warning("rlhf_kernels left %s alone: %s", target.name, why)

    def _version_note(self) -> Optional[str]:
        """None inside the tested versions, else why signatures are checked."""
        if self.tested is None:
            return None
        version = installed_version(self.package, self.pip_name)
        if in_range(version, self.tested):
            return None
        return (f"{self.package} {version or '(version unknown)'} is outside the tested "
                f"versions {self.tested}")

    def _find(self, target: Target, version_note: Optional[str]):
        """(owner, attr, original) of the target, or None (skipped, with the reason)."""
        try:
            root = importlib.import_module(target.module)
        except Exception as e:  # a missing submodule or a dependency that fails to import
            self._skip(target, f"{target.module} does not import ({e.__class__.__name__}: {e})")
            return None
        try:
            found = _resolve(root, target.qualname)
        except (AttributeError, KeyError):
            self._skip(target, f"not found in this version of {self.package}")
            return None
        if version_note and target.signature is not None:
            have, want = parameters(found[2]), expected_parameters(target.signature)
            if have != want:
                self._skip(target, f"{version_note}, and its signature {describe(have)} is "
                                   f"not the one replaced {describe(want)}")
                return None
        return found

    def patch(self) -> List[str]:
        """Replace every target that can be; returns (and logs) "where -> op" lines, and
        `skipped` the targets left alone. Idempotent.

        Raises:
            ImportError: the package itself does not import (nothing is patched).
        """
        if self._active:  # already on: only catch references made since (none expected)
            for _, _, original, new in self._active.values():
                swap_references(self.package, original, new)
            return list(self._report)
        _import(self.package, self.package, self.pip_name)
        self._skipped = []
        note = self._version_note()
        found = [(t, self._find(t, note)) for t in self.targets]  # resolve, then change
        for target, hit in found:
            if hit is None:
                continue
            owner, attr, original = hit
            try:
                new = target.make(original)
            except Decline as e:
                self._skip(target, str(e))
                continue
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
