"""`sh scripts/install_gpu.sh`: install the GPU stack against a torch that can use this machine's GPU.

A torch that is already installed, sees the GPU and is in the range requirements.txt states (Colab's, or a user's
working environment) is kept: the rest is installed with a pip constraint pinning it, so pip never replaces it.
Otherwise the pinned torch is installed from the PyTorch wheel index of the CUDA build that the driver runs (as
Unsloth's installer picks it), then the rest against it. Standard library only: it runs before anything is installed.

Exit codes: 0 installed, 1 failed (a line says why), 2 no NVIDIA GPU here (a line says what to do instead).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import gpu

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
# The torch installed where none fits (the one bench/RESULTS.md measured), with the torchvision built for it.
PINNED_TORCH, PINNED_TORCHVISION = "2.11.0", "0.26.0"
# The CUDA builds of torch 2.11 on the PyTorch wheel index (pytorch/pytorch RELEASE.md: 12.6 legacy, 12.8 and 13.0
# stable; all three carry Turing, the T4's sm_75, and newer). The newest that the driver runs is taken.
BUILDS = {"cu130": (13, 0), "cu128": (12, 8), "cu126": (12, 6)}
INDEX = "https://download.pytorch.org/whl/{}"
NO_GPU = 2
SMOKE = "no NVIDIA GPU here (nvidia-smi finds none); for a CPU run: bash scripts/smoke.sh (the smoke preset)"
COLAB_NO_GPU = "no GPU is attached to this Colab runtime: Runtime > Change runtime type > T4 GPU, then run this again"


@dataclass(frozen=True)
class Torch:
    """The torch this Python imports: version, CUDA build (None: a CPU build), whether it sees a GPU."""
    version: str
    cuda: str | None
    sees_gpu: bool


@dataclass(frozen=True)
class Decision:
    action: str  # "keep", "install", "no-gpu" or "stop"
    reason: str
    build: str | None = None  # the wheel index to install from ("cu126", ...), for "install"


def supported_range(requirements: Path = REQUIREMENTS) -> str:
    """The torch specifier of requirements.txt (">=2.10,<2.15")."""
    for line in requirements.read_text().splitlines():
        found = re.fullmatch(r"\s*torch\s*([<>=!~][^#;]*?)\s*(#.*)?", line)
        if found:
            return found.group(1).replace(" ", "")
    raise ValueError(f"{requirements}: no torch line")


def in_range(version: str, specifier: str) -> bool:
    """Whether `version` (a local label such as +cu128 aside) meets every `>=`, `<`, `==` ... clause of `specifier`."""
    ours = gpu.version_tuple(version.split("+")[0])[:3]
    tests = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
             "==": lambda a, b: a[:len(b)] == b, "!=": lambda a, b: a[:len(b)] != b}
    for clause in specifier.split(","):
        op, bound = re.fullmatch(r"(>=|<=|==|!=|>|<)(.+)", clause).groups()
        if not tests[op](ours, gpu.version_tuple(bound)):
            return False
    return True


def build_for(driver_cuda: tuple[int, int]) -> str | None:
    """The newest torch CUDA build not newer than the driver's CUDA; for a driver below them all (CUDA 12.0 to 12.5)
    the oldest of its CUDA major, which it runs through minor version compatibility (as Colab's driver 550 runs
    Colab's cu12x torch); None for a driver older than CUDA 12.0's 525.60.13."""
    within = [name for name, cuda in BUILDS.items() if cuda <= driver_cuda]
    if within:
        return max(within, key=BUILDS.get)
    compatible = [name for name, cuda in BUILDS.items() if gpu.build_fits(cuda, driver_cuda)]
    return min(compatible, key=BUILDS.get) if compatible else None


def decide(driver_cuda: tuple[int, int] | None, torch: Torch | None, supported: str) -> Decision:
    """What to do with this machine's driver (its CUDA version, None without an NVIDIA GPU) and installed torch."""
    if torch and torch.sees_gpu and in_range(torch.version, supported):
        return Decision("keep", f"torch {torch.version} is installed, uses the GPU and is in the supported range "
                                f"{supported}: keeping it")
    if driver_cuda is None and torch and torch.sees_gpu and torch.cuda:
        driver_cuda = tuple(gpu.version_tuple(torch.cuda)[:2])  # a driver that runs it runs at least its CUDA
    if driver_cuda is None:
        return Decision("no-gpu", SMOKE)
    driver = f"the driver runs CUDA {gpu.cuda_text(driver_cuda)}"
    build = build_for(driver_cuda)
    if build is None:
        return Decision("stop", f"{driver}, older than any torch {PINNED_TORCH} build needs: update the NVIDIA driver "
                                f"to {gpu.MIN_DRIVER[(12, 0)]} or newer ({gpu.MIN_DRIVER[(13, 0)]} for CUDA 13)")
    if torch is None:
        why = "no torch is installed"
    elif torch.sees_gpu:
        why = f"torch {torch.version} uses the GPU but is outside the supported range {supported}"
    elif torch.cuda is None:
        why = f"torch {torch.version} is a CPU build"
    elif not gpu.build_fits(tuple(gpu.version_tuple(torch.cuda)[:2]), driver_cuda):
        why = f"torch {torch.version} is built for CUDA {torch.cuda}, which this driver does not run"
    elif in_range(torch.version, supported):
        return Decision("stop", f"torch {torch.version} (CUDA {torch.cuda}) fits this driver ({driver}) yet sees no "
                                f"GPU, so installing another would not help: check `nvidia-smi` and "
                                f"CUDA_VISIBLE_DEVICES")
    else:
        why = f"torch {torch.version} sees no GPU and is outside the supported range {supported}"
    return Decision("install", f"{why}; {driver}, so installing torch {PINNED_TORCH}+{build} (CUDA "
                               f"{gpu.cuda_text(BUILDS[build])}) from {INDEX.format(build)}", build)


def installed_torch(python: str = sys.executable) -> Torch | None:
    """The torch `python` imports, asked in a child process (a fresh import after an install; warnings kept out)."""
    probe = ("import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
             "torch.cuda.is_available()]))")
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    version, cuda, sees = json.loads(result.stdout.strip().splitlines()[-1])
    return Torch(version, cuda, sees)


def installed_pins(python: str = sys.executable) -> list[str]:
    """`name==version` for the installed torch and torchvision, as pip sees them: the distributions' metadata, which
    can differ from `torch.__version__` (PyPI's CUDA builds report "2.11.0+cu130" but are distribution 2.11.0)."""
    probe = ("import importlib.metadata as m\n"
             "for name in ('torch', 'torchvision'):\n"
             "    try: print(f'{name}=={m.version(name)}')\n"
             "    except m.PackageNotFoundError: pass")
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.split()


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", *args]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: pip failed: {' '.join(command)}")


def install_rest() -> None:
    """requirements.txt with the installed torch (and its torchvision) pinned as constraints: never replaced."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="torch-constraint-", delete=False) as constraints:
        constraints.write("".join(f"{pin}\n" for pin in installed_pins()))
    try:
        pip("-r", str(REQUIREMENTS), "-c", constraints.name)
    finally:
        os.unlink(constraints.name)


def describe(torch: Torch | None) -> str:
    if torch is None:
        return "not installed"
    build = f"CUDA {torch.cuda}" if torch.cuda else "a CPU build"
    return f"{torch.version} ({build}), {'sees' if torch.sees_gpu else 'does not see'} a GPU"


def main() -> int:
    found = gpu.driver()
    torch = installed_torch()
    print(f"NVIDIA driver: {found.describe() if found else 'none found'}; torch: {describe(torch)}", flush=True)
    decision = decide(found.cuda if found else None, torch, supported_range())
    if decision.action == "no-gpu":
        on_colab = any(name.startswith("COLAB_") for name in os.environ)  # Colab's runtime sets COLAB_RELEASE_TAG, ...
        print(COLAB_NO_GPU if on_colab else decision.reason)
        return NO_GPU
    if decision.action == "stop":
        print(f"error: {decision.reason}")
        return 1
    print(decision.reason, flush=True)
    if decision.action == "install":
        pip(f"torch=={PINNED_TORCH}", f"torchvision=={PINNED_TORCHVISION}", "--index-url",
            INDEX.format(decision.build))
        torch = installed_torch()
        if torch is None or not torch.sees_gpu:
            print(f"error: the installed torch {torch.version if torch else ''} still cannot use the GPU "
                  f"({found.describe()}): update the NVIDIA driver")
            return 1
    install_rest()
    print(f"installed the GPU stack on torch {torch.version} (CUDA {torch.cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
