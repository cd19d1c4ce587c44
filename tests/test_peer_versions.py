"""patch() on each pinned version of TRL, veRL and OpenRLHF (tools/run_peer_tests.py PINS).

Each pin runs in a subprocess with the pin first on PYTHONPATH (the main venv keeps its own
versions). There tests/peers/probe_plugin.py records what patch() replaced and skipped, then
the integration's test file runs against the installed package, for the functions patched in
that version: the patched function against the peer's own on fresh random inputs. Inside
TESTED_VERSIONS every target is patched; outside, exactly those whose signature is the one we
replace, and skipped() names every other with the reason. No replacement takes other
parameters than its original (it would call the original with the wrong arity).

The pins are installed by `make test` (tools/run_peer_tests.py install); where they are not,
the tests say so and skip.
"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_peer_tests",
                                               ROOT / "tools" / "run_peer_tests.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

TRL_UTILS, TRL_HEAD = "trl.trainer.utils", "trl.kernels.chunked_logprob.ChunkedLogProbFunction"
VERL_ALGOS = "verl.trainer.ppo.core_algos"
OPENRLHF_LOSS = "openrlhf.models.loss"


def _signature_changed(pin: str, tested: str, have: str, want: str) -> str:
    return (f"{pin} is outside the tested versions {tested}, and its signature ({have}) is not "
            f"the one replaced ({want})")


VALUE_LOSS_ARGS = "vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode"
# per pin: {skipped target: what its reason says}, and -k for the integration's test file
# (the tests of the functions patched in that version, against the installed package)
EXPECTED = {
    ("trl", "1.16.0"): ({}, "entropy_from_logits_matches"),  # all of it runs in the main suite
    ("trl", "1.12.0"): ({
        f"{TRL_UTILS}.selective_log_softmax": _signature_changed(
            "trl 1.12.0", ">=1.16,<1.17", "logits, index", "logits, index, temperature, row_mask"),
        f"{TRL_UTILS}.selective_log_softmax_and_entropy": "not found in this version of trl",
        TRL_HEAD: "trl.kernels.chunked_logprob does not import (ModuleNotFoundError"},
        "entropy_from_logits_matches"),
    ("verl", "0.9.1"): ({}, "installed"),
    ("verl", "0.8.0"): ({
        f"{VERL_ALGOS}.compute_value_loss": _signature_changed(
            "verl 0.8.0", ">=0.9,<0.10", VALUE_LOSS_ARGS,
            f"{VALUE_LOSS_ARGS}, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor")},
        "installed and (logprobs or entrop or gae or veRL_rejects)"),
    ("openrlhf", "0.11.2"): ({}, "installed"),
    ("openrlhf", "0.9.10"): ({
        f"{OPENRLHF_LOSS}.ValueLoss.forward": _signature_changed(
            "openrlhf 0.9.10", ">=0.11,<0.12", "self, values, old_values, returns, action_mask",
            "self, values, old_values, returns, action_mask, dp_size, batch_num_tokens, "
            "global_batch_size")},
        "installed and (log_probs or entropy or gae)"),
}
PINNED = [(peer, version) for peer, versions in peers.PINS.items() for version in versions]


def test_every_pin_has_expectations_and_two_versions_per_peer():
    assert sorted(EXPECTED) == sorted(PINNED)
    assert all(len(versions) >= 2 for versions in peers.PINS.values())


def _run_pin(peer, version, tmp_path):
    """(probe JSON, pytest output) of the pin's subprocess."""
    probe = tmp_path / "probe.json"
    env = peers.env_for(peer, version, str(ROOT / "tests" / "peers"))
    env.update(RK_PEER=peer, RK_PROBE_OUT=str(probe))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "probe_plugin",
           str(ROOT / "tests" / f"test_integrations_{peer}.py"), "-k", EXPECTED[peer, version][1]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{peer} {version}: the integration's tests failed:\n{text[-6000:]}"
    return json.loads(probe.read_text()), text


@pytest.mark.slow
@pytest.mark.parametrize("peer,version", PINNED, ids=[f"{p}-{v}" for p, v in PINNED])
def test_patch_on_a_pinned_version(peer, version, tmp_path):
    if not peers.is_installed(peer, version):
        pytest.skip(f"{peer} {version} is not installed under .peers/: "
                    "python tools/run_peer_tests.py install (make test does)")
    result, output = _run_pin(peer, version, tmp_path)
    assert result["version"] == version
    if (peer, version) not in peers.IN_MAIN_VENV:
        assert result["package_file"].startswith(str(peers.pin_dir(peer, version)))
    assert result["in_range"] is (version == peers.PINS[peer][0])

    want_skipped = EXPECTED[peer, version][0]
    skipped = dict(line.split(": ", 1) for line in result["skipped"])
    assert sorted(skipped) == sorted(want_skipped), result["skipped"]
    for name, why in want_skipped.items():
        assert skipped[name].startswith(why), skipped[name]
    assert sorted(result["replaced"]) == sorted(set(result["targets"]) - set(skipped))
    assert all(line.split(" -> ")[0] not in skipped for line in result["report"])
    assert result["arity_changed"] == []
    assert result["restored"]

    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0 and " skipped" not in output, output[-3000:]
