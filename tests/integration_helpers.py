"""Helpers for the integration tests: stand-in packages and the "installed or not" switch.

OpenRLHF and veRL cannot be imported in the CPU test environment (flash-attn, ray, ...).
Their tests then run against a stand-in package: modules of the same names holding float64
oracles of the patched functions, written from each library's documented behaviour. When
the real package imports, the same tests also run against it.
"""
import contextlib
import importlib
import sys
import types


def importable(module: str):
    """(True, None) when `module` imports here, else (False, why)."""
    try:
        importlib.import_module(module)
        return True, None
    except Exception as e:  # ImportError, or a broken optional dependency
        return False, f"{module} is not importable here ({e.__class__.__name__}: {e})"


def _drop(package: str):
    saved = {name: m for name, m in sys.modules.items()
             if name == package or name.startswith(package + ".")}
    for name in saved:
        del sys.modules[name]
    return saved


@contextlib.contextmanager
def standin_package(package: str, modules: dict):
    """Install modules {dotted name: {attribute: value}} under `package` in sys.modules (the
    real package, if imported, is set aside meanwhile); parents are created as needed."""
    saved = _drop(package)
    try:
        names = set(modules)
        for name in list(names):
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts)))
        for name in sorted(names):  # parents first
            module = types.ModuleType(name)
            for key, value in modules.get(name, {}).items():
                setattr(module, key, value)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        yield {name: sys.modules[name] for name in sorted(names)}
    finally:
        _drop(package)
        sys.modules.update(saved)


@contextlib.contextmanager
def absent(package: str):
    """`package` cannot be imported inside the block (None in sys.modules blocks it)."""
    saved = _drop(package)
    sys.modules[package] = None
    try:
        yield
    finally:
        _drop(package)
        sys.modules.pop(package, None)
        sys.modules.update(saved)
