"""pytest plugin for tests/test_peer_versions.py: what patch() does to one pinned version.

Loaded with `-p probe_plugin` in a subprocess whose PYTHONPATH puts the pin first;
RK_PEER names the integration, RK_PROBE_OUT the JSON file written before any test runs:

    version, package_file   the version patched and where the package was imported from
    in_range                whether that version is inside the integration's TESTED_VERSIONS
    targets                 every target's name
    report, skipped         patch()'s report lines and skipped() ("target: why")
    replaced                the targets patched
    arity_changed           "target: original params vs replacement params" for each
                            replacement whose parameters are not its original's
    restored                unpatch() put every original back
"""
from __future__ import annotations

import importlib
import inspect
import json
import os

from rlhf_kernels.integrations._patching import (describe, in_range, installed_version,
                                                 parameters)


def _own_parameters(fn):
    """(name, kind) of fn's own parameters: not those of the function it wraps."""
    sig = inspect.signature(fn, follow_wrapped=False)
    return tuple((p.name, p.kind.name) for p in sig.parameters.values())


def _arity_changes(replaced) -> list:
    out = []
    for name, (original, new) in replaced.items():
        if isinstance(new, type):  # an autograd.Function: apply takes forward's args but ctx
            have, want = parameters(original)[1:], _own_parameters(new.apply)
        else:
            have, want = parameters(original), _own_parameters(new)
        if have != want:
            out.append(f"{name}: {describe(have)} vs {describe(want)}")
    return out


def _probe(peer: str) -> dict:
    integration = importlib.import_module(f"rlhf_kernels.integrations.{peer}")
    patcher = integration._PATCHER
    report = integration.patch()
    replaced = patcher.replaced
    package = importlib.import_module(peer)
    version = installed_version(peer, patcher.pip_name)
    result = dict(version=version, package_file=package.__file__,
                  in_range=in_range(version, integration.TESTED_VERSIONS),
                  targets=[t.name for t in integration.TARGETS], report=report,
                  skipped=integration.skipped(), replaced=sorted(replaced),
                  arity_changed=_arity_changes(replaced))
    integration.unpatch()
    result["restored"] = all(
        _current(t) is replaced[t.name][0] for t in integration.TARGETS if t.name in replaced)
    return result


def _current(target):
    owner = importlib.import_module(target.module)
    *path, attr = target.qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)


def pytest_configure(config):
    peer, out = os.environ["RK_PEER"], os.environ["RK_PROBE_OUT"]
    with open(out, "w") as f:
        json.dump(_probe(peer), f, indent=1)
