"""requirements.txt as a GPU or Colab user installs it: pip resolves the whole file (`pip install --dry-run --report`,
nothing installed), the pins hold together, and the README names what the install brings besides them.

Needs the package index (CI has it). Linux x86-64 only: that is what Colab and the GPU hosts run, and the set of
packages depends on the platform (Unsloth requires xformers on Linux x86-64 and Windows only).
"""

import json
import platform
import re
import subprocess
import sys

import pytest
from packaging.utils import canonicalize_name

from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the GPU install is resolved for Linux x86-64, what Colab and GPU hosts run")

# Not pinned in requirements.txt, pulled in by Unsloth 2026.10.9 on Linux x86-64; the README names their versions.
BROUGHT_BY_UNSLOTH = ("xformers", "torchvision", "diffusers")


def pins(path) -> dict[str, str]:
    """name -> version of each `name==version` line (comments and blank lines aside)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)\s*(#.*)?", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, str]:
    """name -> version of everything `pip install -r requirements.txt` would install into an empty environment."""
    report = tmp_path_factory.mktemp("pip") / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-r", str(ROOT / "requirements.txt")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"requirements.txt does not resolve:\n{result.stderr[-3000:]}"
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def test_the_pins_hold_together(resolved):
    """Every pinned version is the one pip installs: no pin is overridden or conflicts with another's needs."""
    pinned = pins(ROOT / "requirements.txt")
    assert {"torch", "unsloth", "transformers", "trl", "peft", "bitsandbytes"} <= set(pinned)
    assert {name: resolved.get(name) for name in pinned} == pinned


def test_the_readme_names_what_the_install_brings(resolved):
    """The README's account of the GPU install names the versions pip really resolves, xformers included."""
    readme = (ROOT / "README.md").read_text()
    for name in BROUGHT_BY_UNSLOTH:
        assert name in resolved, f"{name} is no longer installed: update the README"
        assert f"{name} {resolved[name]}" in readme, f"README should say {name} {resolved[name]} is installed"
