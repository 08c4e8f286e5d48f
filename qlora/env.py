"""`python -m qlora env`: what a bug report needs, as `transformers env`, `accelerate env` and `trl env` print it.

Versions of the stack, the NVIDIA driver and whether torch's CUDA build fits it (with the fix when not), the CUDA
devices with their bf16/fp16 support and free memory, llama.cpp's own system info and whether it runs GGUF files here
(`qlora.probe`), and whether llama.cpp's converter is in place.
"""

from __future__ import annotations

import platform
import sys

from . import gpu, probe
from .errors import missing_package
from .isolate import REBUILD_LLAMA_CPP
from .report import PACKAGES, git_commit, package_version

STACK = PACKAGES + ("xformers", "llama_cpp_python", "gguf", "sentencepiece", "safetensors", "mistral_common")


def driver_lines() -> list[str]:
    """The NVIDIA driver, torch's CUDA build, whether they fit, and the fix when they do not."""
    found = gpu.driver()
    driver_line = f"NVIDIA driver: {found.describe() if found else 'none found (no nvidia-smi, no kernel module)'}"
    try:
        import torch
    except ModuleNotFoundError as err:  # often a Python other than the virtualenv's: the report says which
        return [driver_line, f"torch CUDA build: unknown: {missing_package(err)}"]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "none (a CPU build)"
    lines = [driver_line, f"torch CUDA build: {build} (torch {torch.__version__})"]
    if found:
        problem = gpu.unusable_gpu()
        lines.append(f"driver and torch fit: {'no: ' + problem if problem else 'yes'}")
    return lines


def gpu_lines() -> list[str]:
    try:
        import torch
    except ModuleNotFoundError:
        return ["CUDA: unknown (no torch)"]
    if not torch.cuda.is_available():
        return ["CUDA: not available"]
    lines = [f"CUDA: {torch.version.cuda}, {torch.cuda.device_count()} device(s)"]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        bf16 = torch.cuda.is_bf16_supported() if index == torch.cuda.current_device() else props.major >= 8
        lines.append(f"  cuda:{index} {props.name}, compute capability {props.major}.{props.minor}, "
                     f"bf16 {'yes' if bf16 else 'no (trains in fp16)'}, fp16 yes, "
                     f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    return lines


def llama_cpp_lines() -> list[str]:
    try:
        import llama_cpp
    except ImportError:
        return [f"llama.cpp: llama-cpp-python not installed ({REBUILD_LLAMA_CPP})"]
    lines = [f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}"]
    results = probe.check()
    lines.append("llama.cpp check: " + ", ".join(f"{t} {why}" for t, why in results.items()))
    problem = probe.verdict(results)
    if problem:
        lines.append(f"  {problem}")
    return lines


def converter_line() -> str:
    try:
        from .export_job import ExportError
        from .gguf_convert import find_converter
    except ModuleNotFoundError as err:
        return f"llama.cpp converter: unknown ({missing_package(err)})"
    try:
        folder = find_converter()
    except (ExportError, ModuleNotFoundError) as err:  # its version check reads llama-cpp-python's metadata
        return f"llama.cpp converter: {err}"
    stamp = folder / "VERSION"
    made_for = stamp.read_text().strip() if stamp.is_file() else "unknown version"
    return f"llama.cpp converter: {folder} (from llama-cpp-python {made_for})"


def report() -> str:
    lines = [f"qlora-mistral commit: {git_commit() or 'unknown'}",
             f"platform: {platform.platform()}, {platform.machine()}",
             f"python: {platform.python_version()} ({sys.executable})"]
    lines += [f"{name}: {package_version(name) or 'not installed'}" for name in STACK]
    lines += driver_lines() + gpu_lines() + llama_cpp_lines() + [converter_line()]
    return "\n".join(f"- {line}" if not line.startswith("  ") else line for line in lines)


def main() -> int:
    print("Copy and paste this into your bug report:\n")
    print(report())
    return 0
