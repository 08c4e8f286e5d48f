"""requirements.txt as the GPU install (scripts/install_gpu.sh) resolves it: pip's dry run (`pip install --dry-run
--report`, nothing installed) of the whole file with the installed torch as a constraint, once for the torch the install
puts where none fits (the pinned 2.11.0) and once for Colab's (2.10.0, kept there). The pins hold together in both,
and the README names what the install brings besides them.

Needs the package index (CI has it). Linux x86-64 only: that is what Colab and the GPU hosts run, and the set of
packages depends on the platform (Unsloth requires xformers on Linux x86-64 and Windows only).
"""

import json
import os
import platform
import re
import subprocess
import sys

import pytest
from packaging.utils import canonicalize_name

from conftest import ROOT
from qlora.gpu_install import PINNED_TORCH, PINNED_TORCHVISION, in_range, supported_range

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the GPU install is resolved for Linux x86-64, what Colab and GPU hosts run")

# Not pinned in requirements.txt, pulled in by Unsloth 2026.10.9 on Linux x86-64; the README names their versions.
BROUGHT_BY_UNSLOTH = ("xformers", "torchvision", "diffusers")
# Colab's preinstalled torch and torchvision (its runtime moved to torch 2.10: googlecolab/colabtools#5801)
COLAB = {"torch": "2.10.0", "torchvision": "0.25.0"}
PINNED = {"torch": PINNED_TORCH, "torchvision": PINNED_TORCHVISION}


def pins(path) -> dict[str, str]:
    """name -> version of each `name==version` line (comments and blank lines aside)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)\s*(#.*)?", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def resolve(folder, installed: dict[str, str]) -> dict[str, str]:
    """name -> version of everything the install puts into an empty environment holding only `installed` (the
    constraint scripts/install_gpu.sh writes for the torch it keeps)."""
    constraints, report = folder / "constraints.txt", folder / "report.json"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in installed.items()))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-r", str(ROOT / "requirements.txt"), "-c", str(constraints)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"requirements.txt does not resolve with {installed}:\n{result.stderr[-3000:]}"
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, str]:
    """With the pinned torch, as installed where no torch fits the GPU."""
    return resolve(tmp_path_factory.mktemp("pinned"), PINNED)


@pytest.fixture(scope="module")
def resolved_on_colab(tmp_path_factory) -> dict[str, str]:
    return resolve(tmp_path_factory.mktemp("colab"), COLAB)


@pytest.mark.parametrize("where", ["resolved", "resolved_on_colab"])
def test_the_pins_hold_together(where, request):
    """Every pinned version is the one pip installs, with either torch: no pin is overridden or conflicts."""
    found = request.getfixturevalue(where)
    pinned = pins(ROOT / "requirements.txt")
    assert {"unsloth", "transformers", "trl", "peft", "bitsandbytes"} <= set(pinned)
    assert {name: found.get(name) for name in pinned} == pinned
    assert {name: found[name] for name in PINNED} == (PINNED if where == "resolved" else COLAB)
    assert "xformers" in found


def test_both_torches_are_in_the_stated_range():
    """requirements.txt states the range the install keeps a torch in; the pinned and Colab's torch are inside."""
    assert in_range(PINNED_TORCH, supported_range()) and in_range(COLAB["torch"], supported_range())


def test_the_readme_names_what_the_install_brings(resolved):
    """The README's account of the GPU install names the versions pip really resolves, xformers included."""
    readme = (ROOT / "README.md").read_text()
    for name in BROUGHT_BY_UNSLOTH:
        assert name in resolved, f"{name} is no longer installed: update the README"
        assert f"{name} {resolved[name]}" in readme, f"README should say {name} {resolved[name]} is installed"


CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # scripts/setup.sh's torch where no NVIDIA GPU is


def cpu_index_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{CPU_INDEX}/torch/", timeout=20)
    except OSError:
        return False
    return True


@pytest.mark.skipif(not cpu_index_reachable(), reason=f"{CPU_INDEX} cannot be reached (bench/RESULTS.md records what "
                                                          f"it resolves to from a local copy of its wheel)")
def test_the_cpu_setup_resolves_without_any_cuda_package(tmp_path):
    """What scripts/setup.sh installs on a machine without an NVIDIA GPU, resolved by pip alone (this machine's pip
    configuration left out): torch from PyTorch's CPU index, then requirements-dev.txt beside it. No nvidia-*, cuda-*
    or triton package: those come with the package index's (CUDA) torch."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
                             "--quiet", "--report", str(report), "--extra-index-url", CPU_INDEX, "torch==2.13.0+cpu",
                             "-r", str(ROOT / "requirements-dev.txt")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert result.returncode == 0, result.stderr[-3000:]
    names = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
             for i in json.loads(report.read_text())["install"]}
    assert names["torch"] == "2.13.0+cpu"
    assert not [n for n in names if n.startswith(("nvidia", "cuda")) or n == "triton"], names
