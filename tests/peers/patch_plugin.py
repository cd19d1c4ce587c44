"""pytest plugin: a peer's own tests, run with rlhf_kernels' patch applied.

Loaded by tools/run_peer_tests.py (`-p patch_plugin`) with RK_PEER=verl|openrlhf. Before
collection it patches the installed package (every target: a skipped one is an error here),
counts the calls of the rlhf_kernels ops the patched functions reach (RK_PEER_OPS: each must
be reached at least once, so a patch that silently declines everything fails), and marks
the cases of allow_list.txt as expected failures (strict: one that passes is reported).

OpenRLHF's tests load openrlhf/models/*.py from files under a private package name, which
would bypass the installed (patched) modules; such a load is given the installed module's
contents instead, so the tests exercise the patched functions.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections import Counter
from pathlib import Path

import pytest

PEER = os.environ.get("RK_PEER", "")
OPS = tuple(filter(None, os.environ.get("RK_PEER_OPS", "").split(",")))
ALLOW_LIST = Path(__file__).with_name("allow_list.txt")
CALLS: Counter = Counter()


def _allowed():
    """(node id fragment, reason) of this peer's allow-list lines: `peer | fragment | reason`."""
    out = []
    for line in ALLOW_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            peer, fragment, reason = (part.strip() for part in line.split("|", 2))
            if peer == PEER:
                out.append((fragment, reason))
    return out


def _count_calls(integration) -> None:
    """Wrap the ops the integration modules call, to count them."""
    from rlhf_kernels.integrations import _adapters
    for module in (integration, _adapters):
        for name in OPS:
            attr = "_logprobs" if module is _adapters and name == "logprobs" else name
            fn = getattr(module, attr, None)
            if fn is None:
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                CALLS[_name] += 1
                return _fn(*args, **kwargs)
            setattr(module, attr, functools.wraps(fn)(counted))


class _InstalledModuleLoader:
    """Fills a module loaded from openrlhf/<path>.py with the installed openrlhf.<path>."""

    def __init__(self, installed):
        self.installed = installed

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        hidden = {"__name__", "__spec__", "__loader__", "__package__"}
        module.__dict__.update({k: v for k, v in vars(self.installed).items()
                                if k not in hidden})


def _openrlhf_file_loads_use_installed_modules() -> None:
    original = importlib.util.spec_from_file_location

    @functools.wraps(original)
    def spec_from_file_location(name, location=None, *args, **kwargs):
        spec = original(name, location, *args, **kwargs)
        parts = Path(str(location)).with_suffix("").parts if location else ()
        if spec is None or "openrlhf" not in parts:
            return spec
        dotted = ".".join(parts[len(parts) - parts[::-1].index("openrlhf") - 1:])
        spec.loader = _InstalledModuleLoader(importlib.import_module(dotted))
        return spec
    importlib.util.spec_from_file_location = spec_from_file_location


def pytest_configure(config):
    integration = importlib.import_module(f"rlhf_kernels.integrations.{PEER}")
    if PEER == "openrlhf":
        _openrlhf_file_loads_use_installed_modules()
    _count_calls(integration)
    config.rk_report = integration.patch()
    if integration.skipped():
        raise pytest.UsageError("rlhf_kernels did not patch every target:\n  "
                                + "\n  ".join(integration.skipped()))


def pytest_report_header(config):
    return ["rlhf_kernels patch applied:"] + [f"  {line}" for line in config.rk_report]


def pytest_collection_modifyitems(config, items):
    allowed = _allowed()
    for item in items:
        for fragment, reason in allowed:
            if fragment in item.nodeid:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


def pytest_terminal_summary(terminalreporter):
    counts = ", ".join(f"{op} {CALLS[op]}" for op in OPS)
    terminalreporter.write_line(f"rlhf_kernels ops reached through the patch: {counts}")
    unreached = [op for op in OPS if CALLS[op] == 0]
    if unreached:
        terminalreporter.write_line(
            f"FAILED: {', '.join(unreached)} never reached: the patched functions handed every "
            "call to the original, so these tests did not test the patch", red=True)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if any(CALLS[op] == 0 for op in OPS) and exitstatus == 0:
        session.exitstatus = 1  # the patch declined every call: those tests proved nothing
