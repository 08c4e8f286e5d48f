"""This machine's NVIDIA GPU as the driver reports it, and whether a torch build can use it.

torch's own `torch.cuda.is_available()` only says no: it cannot tell a machine without a GPU from one whose driver is
too old for torch's CUDA build (what pip gives Colab and many desktops: torch 2.11 on the package index bundles CUDA
13.0, which needs driver 580). The driver's side comes from `nvidia-smi` (or, without it, the kernel module's
/proc/driver/nvidia/version), so a GPU that torch cannot use is named as such, with the command that fixes it.
Standard library only: scripts/install_gpu.sh runs this before torch is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_COMMAND = "sh scripts/install_gpu.sh"
PROC_VERSION = Path("/proc/driver/nvidia/version")

# Linux driver each CUDA release needs (NVIDIA's CUDA Toolkit release notes, table 3, the GA releases). A CUDA 12.x
# build also runs on any 12.x driver from 525.60.13 on (CUDA minor version compatibility; Colab runs its cu12x torch
# on driver 550, CUDA 12.4); CUDA 13.x needs a 13.x driver, 580.65.06 or newer.
MIN_DRIVER = {(13, 0): "580.65.06", (12, 9): "575.51.03", (12, 8): "570.26", (12, 6): "560.28.03",
              (12, 5): "555.42.02", (12, 4): "550.54.14", (12, 3): "545.23.06", (12, 2): "535.54.03",
              (12, 1): "530.30.02", (12, 0): "525.60.13"}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver: its version, the newest CUDA it runs, and the GPUs it lists."""
    version: str
    cuda: tuple[int, int]
    gpus: tuple[str, ...] = ()

    def describe(self) -> str:
        names = f"{', '.join(self.gpus)}, " if self.gpus else ""
        return f"{names}driver {self.version} (CUDA {cuda_text(self.cuda)})"


def cuda_text(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


def cuda_of_driver(version: str) -> tuple[int, int] | None:
    """The newest CUDA a driver version runs (from MIN_DRIVER), None below CUDA 12's minimum."""
    fitting = [cuda for cuda, needed in MIN_DRIVER.items() if version_tuple(version) >= version_tuple(needed)]
    return max(fitting) if fitting else None


def _nvidia_smi(*args: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def driver() -> Driver | None:
    """The NVIDIA driver of this machine, or None where there is none (no `nvidia-smi`, no kernel module)."""
    header = _nvidia_smi()
    if header:
        version = re.search(r"Driver Version:\s*([\d.]+)", header)
        cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header)
        if version:
            listed = _nvidia_smi("-L") or ""
            gpus = tuple(re.findall(r"^GPU \d+: (.+?)(?: \(UUID:.*)?$", listed, flags=re.M))
            return Driver(version.group(1), (int(cuda.group(1)), int(cuda.group(2))) if cuda
                          else cuda_of_driver(version.group(1)) or (0, 0), gpus)
    if PROC_VERSION.is_file():  # the kernel module is loaded but nvidia-smi is missing (some containers)
        found = re.search(r"Kernel Module\s+([\d.]+)", PROC_VERSION.read_text(errors="replace"))
        if found:
            return Driver(found.group(1), cuda_of_driver(found.group(1)) or (0, 0))
    return None


def build_fits(build_cuda: tuple[int, int], driver_cuda: tuple[int, int]) -> bool:
    """Whether a CUDA build runs on a driver: any driver of the same CUDA major or a newer one (minor version
    compatibility within a major)."""
    return build_cuda[0] <= driver_cuda[0]


def torch_build() -> tuple[str, str | None]:
    """(torch's version, its CUDA version or None for a CPU build)."""
    import torch

    return torch.__version__, torch.version.cuda


def why_unfit(torch_version: str, torch_cuda: str | None, found: Driver) -> str:
    """Why torch cannot use the driver's GPU, for the one-line message."""
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build"
    build = tuple(version_tuple(torch_cuda)[:2])
    if not build_fits(build, found.cuda):
        needed = MIN_DRIVER.get(build) or MIN_DRIVER.get((build[0], 0), "a newer one")
        return f"torch {torch_version} is built for CUDA {torch_cuda}, which needs driver {needed} or newer"
    return (f"torch {torch_version} (CUDA {torch_cuda}) fits this driver yet sees no GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}; does `nvidia-smi` work?)")


def unusable_gpu() -> str | None:
    """One line when this machine has an NVIDIA GPU that torch cannot use, else None (usable, or no NVIDIA GPU)."""
    import torch

    if torch.cuda.is_available():
        return None
    found = driver()
    if found is None:
        return None
    version, cuda = torch_build()
    return (f"this machine has an NVIDIA GPU ({found.describe()}) but torch cannot use it: "
            f"{why_unfit(version, cuda, found)}; run `{INSTALL_COMMAND}` to install a torch that fits this driver")
