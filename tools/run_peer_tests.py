"""The trainers rlhf_kernels patches, at pinned versions, beside the main venv.

    python tools/run_peer_tests.py install    # each pin under .peers/<name>-<version>
    python tools/run_peer_tests.py shipped    # + veRL's / OpenRLHF's own tests, patched
    python tools/run_peer_tests.py pythonpath verl 0.8.0

The main venv keeps its own torch / transformers / trl: every pin is installed with
`pip install --no-deps --target`, its few import-time dependencies go to .peers/deps, and a
pin is used by a subprocess whose PYTHONPATH puts it first (see `pythonpath`).
tests/test_peer_versions.py patches each pin; `shipped` downloads the distributions that
ship tests (veRL's source distribution, OpenRLHF's wheel), extracts the test files that
exercise the functions we patch into .peers/shipped/, and runs them with
tests/peers/patch_plugin.py, which applies our patch first. Nothing of theirs is kept in
this repository; downloads are cached under .peers/ (git-ignored).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"

# the first version of each is the one its integration is written against (TESTED_VERSIONS);
# trl 1.16.0 is the main venv's (Makefile CPU_STACK), so it is not installed again
PINS: Dict[str, Tuple[str, ...]] = {
    "trl": ("1.16.0", "1.12.0"),
    "verl": ("0.9.1", "0.8.0"),
    "openrlhf": ("0.11.2", "0.9.10"),
}
IN_MAIN_VENV = {("trl", "1.16.0")}

# what veRL (ray, tensordict, hydra, ...) and OpenRLHF (ray, torchdata, ...) import at module
# level beyond the main venv, each without its own dependencies: the exact closure needed
DEPS = (
    "ray==2.60.0", "tensordict==0.15.3", "pyvers==0.2.3", "cloudpickle==3.1.3",
    "codetiming==1.4.0", "hydra-core==1.3.8", "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3", "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
    "attrs==26.1.0", "orjson==3.13.0", "pylatexenc==2.11", "torchdata==0.11.0",
    "aiohttp==3.14.5", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0", "frozenlist==1.8.0",
    "multidict==7.2.1", "yarl==1.25.1", "propcache==0.5.4",
)
NEEDS_DEPS = {"verl", "openrlhf"}
# flash-attn / vLLM stand-ins: OpenRLHF imports them at module level
STUBS = {"openrlhf": ROOT / "tests" / "peers" / "openrlhf_stubs"}

# the shipped tests that call what we patch: (version, distribution kind, test files)
SHIPPED = {
    "verl": ("0.9.1", "sdist", ("tests/trainer/ppo/test_core_algos_on_cpu.py",
                                "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py")),
    "openrlhf": ("0.11.2", "wheel", ("tests/test_actor_entropy_temperature.py",
                                     "tests/test_loss_aggregation.py")),
}
# the rlhf_kernels ops those tests must reach through the patched functions
SHIPPED_OPS = {"verl": ("gae", "ppo_critic_loss"), "openrlhf": ("logprobs",)}
PLUGIN_DIR = ROOT / "tests" / "peers"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                   check=True)


def _install_into(dest: Path, specs: Tuple[str, ...]) -> None:
    """pip install --no-deps --target, into a fresh folder renamed into place when complete
    (a run cut short leaves no half-installed pin behind)."""
    stamp = dest / ".installed"
    if stamp.exists() and stamp.read_text() == "\n".join(specs):
        return
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _pip("install", "--no-deps", "--target", str(partial), *specs)
    (partial / ".installed").write_text("\n".join(specs))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def pin_dir(peer: str, version: str) -> Path:
    return PEERS / f"{peer}-{version}"


def install() -> None:
    """Every pin (and the shared import-time dependencies) under .peers/."""
    PEERS.mkdir(exist_ok=True)
    _install_into(PEERS / "deps", DEPS)
    for peer, versions in PINS.items():
        for version in versions:
            if (peer, version) not in IN_MAIN_VENV:
                _install_into(pin_dir(peer, version), (f"{peer}=={version}",))


def is_installed(peer: str, version: str) -> bool:
    need = [] if (peer, version) in IN_MAIN_VENV else [pin_dir(peer, version)]
    if peer in NEEDS_DEPS:
        need.append(PEERS / "deps")
    return all((d / ".installed").exists() for d in need)


def pythonpath(peer: str, version: str) -> List[str]:
    """The folders a subprocess puts first on sys.path to import this pin."""
    paths = [] if (peer, version) in IN_MAIN_VENV else [str(pin_dir(peer, version))]
    if peer in NEEDS_DEPS:
        paths.append(str(PEERS / "deps"))
    if peer in STUBS:
        paths.append(str(STUBS[peer]))
    return paths


def env_for(peer: str, version: str, *extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    parts = pythonpath(peer, version) + list(extra) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


def _download(peer: str, version: str, kind: str) -> Path:
    cache = PEERS / "downloads"
    pattern = f"{peer}-{version}" + (".tar.gz" if kind == "sdist" else "-*.whl")
    found = sorted(cache.glob(pattern))
    if not found:
        binary = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
        _pip("download", "--no-deps", *binary, "-d", str(cache), f"{peer}=={version}")
        found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"pip download {peer}=={version} ({kind}) gave no {pattern}")
    return found[0]


def _members(archive: Path) -> Dict[str, bytes]:
    """{path inside the distribution (top folder of an sdist dropped): content}."""
    if archive.suffix == ".whl":  # tests/ may sit under <dist>.data/purelib/
        with zipfile.ZipFile(archive) as z:
            named = {re.sub(r"^[^/]+\.data/[^/]+/", "", n): n for n in z.namelist()}
            return {k: z.read(n) for k, n in named.items() if k.startswith("tests/")}
    with tarfile.open(archive) as t:
        out = {}
        for m in t.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith("tests/"):
                out[name] = t.extractfile(m).read()
        return out


def extract_tests(peer: str) -> Tuple[Path, Tuple[str, ...]]:
    """The selected test files, with the package __init__ / conftest files above them, into
    .peers/shipped/<peer>-<version>/; returns (that folder, the test files)."""
    version, kind, files = SHIPPED[peer]
    members = _members(_download(peer, version, kind))
    missing = [f for f in files if f not in members]
    if missing:
        raise SystemExit(f"{peer} {version} no longer ships {', '.join(missing)}")
    dest = PEERS / "shipped" / f"{peer}-{version}"
    shutil.rmtree(dest, ignore_errors=True)
    wanted = set(files)
    for f in files:
        parts = Path(f).parts
        for i in range(1, len(parts)):
            for helper in ("__init__.py", "conftest.py"):
                wanted.add("/".join(parts[:i] + (helper,)))
    for name in sorted(wanted & set(members)):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(members[name])
    (dest / "pytest.ini").write_text("[pytest]\n")  # not this repository's settings
    return dest, files


def run_shipped(peer: str) -> int:
    version = SHIPPED[peer][0]
    if version != PINS[peer][0]:
        raise SystemExit(f"the shipped tests of {peer} must be those of its first pin")
    dest, files = extract_tests(peer)
    env = env_for(peer, version, str(PLUGIN_DIR))
    env.update(RK_PEER=peer, RK_PEER_OPS=",".join(SHIPPED_OPS[peer]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "patch_plugin",
           "--rootdir", str(dest), *files]
    print(f"== {peer} {version}: its own tests, rlhf_kernels patch applied", flush=True)
    return subprocess.run(cmd, cwd=dest, env=env).returncode


def main(argv: List[str]) -> int:
    command = argv[0] if argv else "shipped"
    if command == "install":
        install()
        return 0
    if command == "pythonpath":
        print(os.pathsep.join(pythonpath(argv[1], argv[2])))
        return 0
    if command == "shipped":
        install()
        return max(run_shipped(peer) for peer in SHIPPED)
    raise SystemExit(f"unknown command {command!r}: install, shipped or pythonpath")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
