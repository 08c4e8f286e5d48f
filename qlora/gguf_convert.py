"""GGUF files made by llama.cpp's own tools: its converters (a merged model folder to f16, a LoRA adapter to
adapter.gguf) and its quantizer (f16 to the smaller types).

The converters are llama.cpp's `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py`, taken from llama-cpp-python's
source distribution by `scripts/get_llama_cpp_converter.sh` (no git, no cmake), and run in a subprocess; quantization
is llama.cpp's, called through llama-cpp-python. Every file is written under a temporary name and renamed when
complete; the tools' own output goes to llama.cpp.log beside it, and its last lines are shown when one fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

from . import atomic
from .errors import nearly_full
from .export_job import LOG, ExportError

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # a folder holding the converters, conversion/ and gguf-py/
HF_CONVERTER, LORA_CONVERTER = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"
CONVERTER_DIR = ROOT / ".llama.cpp"
INSTALL_CONVERTER = "sh scripts/get_llama_cpp_converter.sh"
# f32, the adapter as trained (PEFT keeps LoRA weights in float32): llama.cpp multiplies f32 LoRA matrices in f32,
# while with f16 ones it would also round the activations to f16 before each LoRA product (ggml's CPU matmul).
LORA_OUTTYPE = "f32"
LOG_TAIL = 20  # lines of llama.cpp's log shown when its converter or quantizer fails


def find_converter(script: str = HF_CONVERTER) -> Path:
    """The folder with llama.cpp's converters: $LLAMA_CPP_CONVERTER, else .llama.cpp/ in the repository."""
    folder = Path(os.environ.get(CONVERTER_ENV) or CONVERTER_DIR)
    if not (folder / script).is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise ExportError(f"{folder}: llama.cpp's {script} is missing; run `{INSTALL_CONVERTER}` "
                          f"(or set {CONVERTER_ENV} to a folder with {script}, conversion/ and gguf-py/)")
    _check_converter_version(folder)
    return folder


def _check_converter_version(folder: Path) -> None:
    """A converter newer or older than the llama.cpp inside llama-cpp-python may write files it cannot read."""
    from importlib.metadata import version

    stamp = folder / "VERSION"  # written by the install script; absent from a converter set up by hand
    if not stamp.is_file():
        return
    made_for, installed = stamp.read_text().strip(), version("llama-cpp-python")
    if made_for != installed:
        raise ExportError(f"{stamp}: converter from llama-cpp-python {made_for} but {installed} is installed; "
                          f"run `{INSTALL_CONVERTER}` again")


def convert_f16(model_dir: Path, target: Path, converter: Path, chat_template: str) -> None:
    """`model_dir` to an f16 GGUF whose tokenizer.chat_template is `chat_template` (the one written for llama.cpp's
    tokenizer, which adds SentencePiece's space after a special token itself): the converter reads a view of the
    folder, links to its files beside that template."""
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent) as view:
        for item in model_dir.iterdir():
            if item.name != "chat_template.jinja":
                os.symlink(item.resolve(), Path(view) / item.name)
        Path(view, "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        run_converter(converter, HF_CONVERTER, view, "--outtype", "f16", target=target)


def convert_lora(adapter_dir: Path, base: str, target: Path, converter: Path) -> None:
    """llama.cpp's convert_lora_to_gguf.py. Of the base it reads config.json alone, so a hub base costs one small
    download, not the weights."""
    with tempfile.TemporaryDirectory(prefix="base-config-") as config_dir:
        write_base_config(base, Path(config_dir))
        run_converter(converter, LORA_CONVERTER, str(adapter_dir), "--base", config_dir, "--outtype", LORA_OUTTYPE,
                      target=target)


def write_base_config(base: str, folder: Path) -> None:
    """The base's config.json (its folder's, else the hub's) into `folder`, without a 4-bit checkout's
    quantization_config: the converter would try to dequantize base weights it never reads."""
    source = Path(base) / "config.json"
    if not source.is_file():
        from huggingface_hub import hf_hub_download

        from .hub import hub_unreachable

        hub_unreachable()  # with no connection: the cache alone, without huggingface_hub's retries
        try:
            source = Path(hf_hub_download(base, "config.json"))
        except (OSError, ValueError) as err:  # offline, no such repo, a malformed id
            raise ExportError(f"{base}: cannot get its config.json, which llama.cpp's LoRA converter needs "
                              f"({first_line(err)})") from None
    settings = json.loads(source.read_text(encoding="utf-8"))
    settings.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def first_line(err: Exception) -> str:
    """The hub's errors span several lines; the first says what happened."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def run_converter(converter: Path, script: str, *args: str, target: Path) -> None:
    """One of llama.cpp's converters in a subprocess writing `target`, its own gguf-py first on the path (PyPI's gguf
    lags); its output goes to the log beside `target`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(converter / "gguf-py"), os.environ.get("PYTHONPATH")])))
    log = target.parent / LOG
    with atomic.atomic_path(target) as tmp, open(log, "a", encoding="utf-8") as out:
        print(f"converting to {target.name} with llama.cpp's {script}", flush=True)
        out.write(f"==== {script} -> {target.name}\n")
        out.flush()
        result = subprocess.run([sys.executable, str(converter / script), *args, "--outfile", str(tmp)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:  # raised inside: atomic_path then removes the half-written file
            said = last_error(log)
            # numpy's short write ("N requested and M written") names no errno, and on a full disk the log may lack
            # the traceback: a disk with no room left says why
            if "Errno 28" in said or nearly_full(target):  # said in one line by export.staged()
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
            raise ExportError(f"{target}: llama.cpp's {script} failed (exit {result.returncode})"
                              f"{': ' + said if said else ''}; {log_tail(log)}")


def quantize(f16_path: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer on every core; its log (a line per tensor) goes to the log beside `target`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # every core
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    logger = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log at this level or above,
    level = logger.level                            # to whatever sys.stderr is then
    logger.setLevel(logging.INFO)
    log = target.parent / LOG
    print(f"quantizing to {target.name} with llama.cpp", flush=True)
    try:
        with atomic.atomic_path(target) as tmp, open(log, "a", encoding="utf-8") as out:
            out.write(f"==== quantize {f16_path.name} -> {target.name}\n")
            with redirect_stderr(out):
                failed = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params) != 0
            if failed:
                raise ExportError(f"{target}: llama.cpp could not quantize {f16_path.name} to {gguf_type}; "
                                  f"{log_tail(log)}")
    finally:
        logger.setLevel(level)


def last_error(log: Path) -> str:
    """The exception a Python traceback in the log ends with ("OSError: ..."), or ""."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return next((line.strip() for line in reversed(lines) if re.match(r"\w+(Error|Exception)\b", line)), "")


def log_tail(log: Path) -> str:
    """The end of llama.cpp's log, printed, for an error line to point at (the log goes with a failed export's
    staging folder)."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
    print("\n".join(f"  | {line}" for line in lines), file=sys.stderr, flush=True)
    return f"the last {len(lines)} lines of its output are above"
