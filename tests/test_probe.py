"""The install check (qlora.probe): llama.cpp runs tiny f16, q8_0 and q4_k_m files in child processes, and a crash in
one of them becomes one line naming the signal and the rebuild command. `python -m qlora env` reports it."""

import os
import signal
import subprocess
import sys

from conftest import ROOT
from qlora import probe
from qlora.isolate import REBUILD_LLAMA_CPP


def test_llama_cpp_runs_every_probe_file():
    results = probe.check()
    assert results == {t: "ok" for t in probe.TYPES}
    assert probe.verdict(results) is None


def die_like_a_native_build_on_the_wrong_cpu(f16_path: str, gguf_type: str) -> list[int]:
    """Runs in the probe's child process (spawn imports this module by name): quantized files hit SIGILL."""
    if gguf_type != "f16":
        os.kill(os.getpid(), signal.SIGILL)
    return probe.evaluate(f16_path, gguf_type)


def test_a_crash_in_llama_cpp_is_one_line_naming_the_signal_and_the_rebuild(monkeypatch):
    monkeypatch.setattr(probe, "evaluate", die_like_a_native_build_on_the_wrong_cpu)
    results = probe.check()  # the parent survives its children's deaths
    assert results["f16"] == "ok"
    assert results["q8_0"] == "llama.cpp on a q8_0 file was killed by SIGILL"
    assert "SIGILL" in results["q4_k_m"]
    message = probe.verdict(results)
    assert message.startswith("llama.cpp on a q8_0 file was killed by SIGILL (2 of 3 probe files failed)")
    assert message.endswith(REBUILD_LLAMA_CPP) and "\n" not in message


def test_env_report_names_the_stack_and_the_llama_cpp_check():
    result = subprocess.run([sys.executable, "-m", "qlora", "env"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("- torch: ", "- transformers: ", "- trl: ", "- peft: ", "- unsloth: ", "- llama_cpp_python: ",
                 "- CUDA: ", "- llama.cpp system info: ", "- llama.cpp check: f16 ok, q8_0 ok, q4_k_m ok",
                 "- llama.cpp converter: "):
        assert line in out, line
    assert "Traceback" not in result.stderr


def test_env_report_from_a_python_without_the_stack_says_so_without_a_traceback():
    """`python3 -m qlora env` outside the virtualenv (here: site-packages left out with -S) still reports, and says
    which Python lacks torch and what installs it."""
    result = subprocess.run([sys.executable, "-S", "-m", "qlora", "env"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "- torch: not installed" in result.stdout
    assert (f"- torch CUDA build: unknown: the Python package 'torch' is not installed for {sys.executable}; "
            f"install the requirements") in result.stdout
    assert "- CUDA: unknown (no torch)" in result.stdout and "- llama.cpp: llama-cpp-python not installed" in result.stdout
