"""Adapter -> merged 16-bit model -> GGUF files (f16, then quantized) -> Ollama Modelfile, each file checked; or, with
--lora_only, adapter -> adapter.gguf + a Modelfile that puts it on a base llama.cpp (or an older Ollama) already has.

The export is a transaction: it is built in a staging folder beside the export folder (`.export.tmp-PID`), its report
written last, and swapped in whole when complete (qlora/atomic.py's pattern one level up). A failed or killed export
leaves the old export as it was (or, killed in the instant between the swap's two renames, no export folder, which
the next export puts back). The merge streams the base tensor by tensor (qlora/merge.py) and the checks' reference
reads its weights layer by layer from disk (qlora/gguf_check.py), so neither holds the model in RAM.

The GGUF converters are llama.cpp's own `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py`, taken from
llama-cpp-python's source distribution by `scripts/get_llama_cpp_converter.sh` (no git, no cmake); quantization is
llama.cpp's, called through llama-cpp-python. Every file is written under a temporary name and renamed when complete.
llama.cpp reads each finished file in a child process (qlora/gguf_check.py): if it dies there (SIGILL where
llama-cpp-python was built for another CPU), the files stay, the report says which check could not run, and the export
ends with one line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import atomic, isolate, runfolder, runtimes
from .chat import Conversation, PromptFormat, find_tokenizer_file, load_prompt_format, tokenizer_file_in
from .config import FIELDS, Config, is_dump, to_yaml
from .errors import nearly_full
from .export_summary import LOG, closing_summary
from .gguf_check import CHECK_PROMPTS, GREEDY_STEPS, MIN_COSINE, NEAR_TIE, check_all, check_file, mismatches, prompt_set
from .hub import fetching
from .merge import MergeError, base_checkout, dequantized_checkout, merge_into
from .hub import LOCAL_BASE, parameter_count
from .model import check_safetensors_adapter
from .modelfile import modelfile, ollama_template

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # a folder holding the converters, conversion/ and gguf-py/
HF_CONVERTER, LORA_CONVERTER = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"
CONVERTER_DIR = ROOT / ".llama.cpp"
INSTALL_CONVERTER = "sh scripts/get_llama_cpp_converter.sh"

# 4-bit repos whose 16-bit original is known: merging into the original avoids NF4's rounding of the base weights.
KNOWN_16BIT = {
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.2",
    "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit": "mistralai/Mistral-Nemo-Instruct-2407",
    "unsloth/mistral-7b-instruct-v0.3-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.3",
    "unsloth/mistral-7b-v0.3-bnb-4bit": "mistralai/Mistral-7B-v0.3",
    "unsloth/mistral-7b-bnb-4bit": "mistralai/Mistral-7B-v0.1",
}

# Bits per weight of each GGUF type on Mistral 7B (llama.cpp's mixes keep some tensors at higher precision), rounded
# up: only used to check the disk space before starting.
GGUF_BITS = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6, "q5_0": 5.5, "q4_k_m": 4.9,
             "q4_k_s": 4.6, "q4_0": 4.6, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4}
OLLAMA_PREFERRED = "q4_k_m"  # Ollama's own default quantization: the Modelfile's FROM when it was written

ADAPTER_GGUF = "adapter.gguf"
BASE_GGUF = "base-f16.gguf"  # --convert_base's output, the base adapter.gguf is checked on
# f32, the adapter as trained (PEFT keeps LoRA weights in float32): llama.cpp multiplies f32 LoRA matrices in f32,
# while with f16 ones it would also round the activations to f16 before each LoRA product (ggml's CPU matmul).
LORA_OUTTYPE = "f32"
# Ollama library models of known bases: the adapter's Modelfile FROM when --ollama_base is not given.
OLLAMA_BASES = {"unsloth/mistral-7b-instruct-v0.2-bnb-4bit": "mistral:7b-instruct-v0.2",
                "mistralai/Mistral-7B-Instruct-v0.2": "mistral:7b-instruct-v0.2",
                "unsloth/mistral-7b-instruct-v0.3-bnb-4bit": "mistral:v0.3",
                "mistralai/Mistral-7B-Instruct-v0.3": "mistral:v0.3",
                "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit": "mistral-nemo:12b",
                "mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo:12b"}
# adapter_config.json settings that llama.cpp's LoRA (W + alpha / r * B @ A on each matrix) cannot express
UNSUPPORTED_LORA = {"use_dora": "DoRA", "use_rslora": "rsLoRA's alpha / sqrt(r) scale",
                    "alpha_pattern": "per-module alpha", "modules_to_save": "fully trained modules"}
# llama.cpp file types (general.file_type) of bases an adapter is checked on strictly, as an f16 file is
STRICT_BASE_TYPES = ("ALL_F32", "MOSTLY_F16")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors") + TOKENIZER_FILES
REPORT = "export_report.json"
# What an export writes: a re-export drops the old export's files of these names (they would be taken for the new
# adapter's); anything else in the old folder (the user's own files, a base GGUF) is carried over into the new one.
LLAMA_CPP_TEMPLATE = "chat_template.jinja"  # beside adapter.gguf: the template for llama-server --chat-template-file
EXPORT_OUTPUTS = ("merged", "adapter", ADAPTER_GGUF, LLAMA_CPP_TEMPLATE, "Modelfile", "config.yaml", REPORT, LOG)
LOG_TAIL = 20  # lines of llama.cpp's log shown when its converter or quantizer fails


class ExportError(RuntimeError):
    """An export that cannot go on: the message names the file or setting and what to do."""


@dataclass
class Plan:
    adapter_dir: Path
    export_dir: Path
    base: str
    base_note: str
    dequantize: bool
    gguf_types: list[str]
    system_prompt: str | None  # the Modelfile's SYSTEM
    # --lora_only
    trained_on: str = ""  # the adapter's base: its config.json is all llama.cpp's LoRA converter reads of it
    ollama_base: str = ""  # the Modelfile's FROM
    base_gguf: Path | None = None  # the base GGUF adapter.gguf is checked on (None: not checked), where it ends up
    convert_base: bool = False  # base_gguf is to be converted from the 16-bit base
    work_dir: Path | None = None  # where the files are written: the staging folder, swapped in for export_dir

    @property
    def folder(self) -> Path:
        return self.work_dir or self.export_dir

    @property
    def merged_dir(self) -> Path:
        return self.folder / "merged"

    @property
    def adapter_gguf(self) -> Path:
        return self.folder / ADAPTER_GGUF

    @property
    def base_gguf_file(self) -> Path | None:
        """The base GGUF as the export reads it: --convert_base writes it into the staging folder."""
        return self.folder / BASE_GGUF if self.convert_base else self.base_gguf

    def gguf(self, gguf_type: str) -> Path:
        return self.folder / f"model-{gguf_type}.gguf"


# ---------------------------------------------------------------- planning


def resolve_base(adapter_dir: Path, base_model_16bit: str | None) -> tuple[str, bool, str]:
    """(base to merge into, whether it must be dequantized, a sentence saying which and why)."""
    from .model import adapter_base

    if base_model_16bit:
        return base_model_16bit, False, f"merging into {base_model_16bit} (--base_model_16bit)"
    trained_on = adapter_base(adapter_dir)
    if trained_on in KNOWN_16BIT:
        original = KNOWN_16BIT[trained_on]
        return original, False, f"merging into {original}, the 16-bit original of {trained_on}"
    if "bnb-4bit" in trained_on or _is_quantized(trained_on):
        return trained_on, True, (f"no known 16-bit original of {trained_on}: dequantizing its 4-bit weights "
                                  f"(pass --base_model_16bit to merge into the original instead)")
    return trained_on, False, f"merging into {trained_on}, the base the adapter was trained on"


def _is_quantized(base: str) -> bool:
    from transformers import AutoConfig

    with fetching(base, "base model", LOCAL_BASE):
        return getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None


def gguf_types(requested: list[str]) -> list[str]:
    """f16 first (the source of every quantization and the file checked strictly), then the others in order."""
    unknown = [t for t in requested if t.lower() not in GGUF_BITS]
    if unknown:
        raise ExportError(f"--gguf_types: unknown type(s) {', '.join(unknown)}; choose from {', '.join(GGUF_BITS)}")
    return ["f16"] + [t for t in dict.fromkeys(t.lower() for t in requested) if t != "f16"]


def plan(config: Config) -> Plan:
    adapter_dir = Path(config.adapter_dir or config.output_dir)
    export_dir = Path(config.export_dir or adapter_dir / "export")
    if config.merged_only and config.lora_only:
        raise ExportError("--merged_only and --lora_only exclude each other; pass one")
    if not config.lora_only and (config.ollama_base or config.base_gguf or config.convert_base):
        raise ExportError("--ollama_base, --base_gguf and --convert_base go with --lora_only; add it or drop them")
    if (config.lora_only or config.merged_only) and config.gguf_types != FIELDS["gguf_types"].default_factory():
        only = "--lora_only writes adapter.gguf alone (f32)" if config.lora_only else "--merged_only writes no GGUF"
        raise ExportError(f"--gguf_types are the merged model's GGUF files, and {only}; drop one of them")
    check_export_dir(adapter_dir, export_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter or training output folder)")
    check_safetensors_adapter(adapter_dir)  # FileNotFoundError: a one-line error from export_gguf.py
    if trained_setting(adapter_dir, "template") == "instruction" and not config.merged_only:
        raise ExportError(f"{adapter_dir}: trained with template: instruction, but GGUF files and the Modelfile "
                          f"use Mistral's [INST] prompt; pass --merged_only, or train with template: mistral")
    system = config.system_prompt or trained_setting(adapter_dir, "system_prompt")  # Ollama's default: as trained
    if '"""' in (system or ""):
        raise ExportError('system_prompt: cannot contain """ (the quote of Ollama\'s Modelfile)')
    types = gguf_types(config.gguf_types)
    if config.lora_only:
        return adapter_plan(config, adapter_dir, export_dir, system)
    base, dequantize, note = resolve_base(adapter_dir, config.base_model_16bit)
    return Plan(adapter_dir, export_dir, base, note, dequantize, [] if config.merged_only else types, system)


def check_export_dir(adapter_dir: Path, export_dir: Path) -> None:
    """The export replaces its folder whole (carrying the user's files over): it must not be the training folder, one
    that holds it, or one whose config.yaml (an export's own output) is not an export's."""
    adapter, folder = adapter_dir.resolve(), export_dir.resolve()
    if folder == adapter or folder in adapter.parents:
        raise ExportError(f"--export_dir {export_dir}: holds the adapter {adapter_dir}, and an export replaces its "
                          f"folder whole; choose a folder of its own, such as {adapter_dir / 'export'}")
    if (folder / "adapter_config.json").exists() or any(folder.glob("checkpoint-*")):
        raise ExportError(f"--export_dir {export_dir}: holds a training run or an adapter, whose config.yaml the "
                          f"export would replace; choose a folder of its own")
    if (folder / "config.yaml").exists() and not is_dump(folder / "config.yaml"):
        raise ExportError(f"--export_dir {export_dir}: its config.yaml is not an export's (a file of yours?), and "
                          f"the export writes its own there; choose another folder, or move the file")
    if folder.is_dir() and not (folder / "config.yaml").exists():  # no export wrote here: names it writes are yours
        theirs = [item.name for item in folder.iterdir() if is_export_output(item.name)]
        if theirs:
            raise ExportError(f"--export_dir {export_dir}: holds {', '.join(sorted(theirs))}, which no export wrote "
                              f"and the export would replace; choose another folder, or move them")


def is_export_output(name: str) -> bool:
    return name in EXPORT_OUTPUTS or (name.startswith("model-") and name.endswith(".gguf"))


def adapter_plan(config: Config, adapter_dir: Path, export_dir: Path, system: str | None) -> Plan:
    """--lora_only: adapter.gguf and its Modelfile; checked in llama.cpp on a base GGUF given or converted. Without a
    check the base's weights are neither read nor downloaded."""
    from .model import adapter_base

    check_convertible(adapter_dir)
    trained_on = adapter_base(adapter_dir)
    ollama = ollama_base(trained_on, config.ollama_base, export_dir / BASE_GGUF if config.convert_base else None)
    if config.base_gguf and config.convert_base:
        raise ExportError("--base_gguf and --convert_base exclude each other; pass one")
    if config.base_gguf and not Path(config.base_gguf).is_file():
        raise ExportError(f"--base_gguf {config.base_gguf}: no such file")
    check_on = Path(config.base_gguf) if config.base_gguf else export_dir / BASE_GGUF if config.convert_base else None
    if check_on is None and config.base_model_16bit:
        raise ExportError("--base_model_16bit with --lora_only is the reference adapter.gguf is checked against: add "
                          "--base_gguf or --convert_base, or drop it")
    if check_on is None:
        note = "writing the adapter as GGUF, unchecked (--base_gguf or --convert_base check it in llama.cpp)"
        return Plan(adapter_dir, export_dir, trained_on, note, False, [], system, trained_on, ollama)
    base, dequantize, note = resolve_base(adapter_dir, config.base_model_16bit)
    if dequantize and config.convert_base:
        raise ExportError(f"--convert_base: {base} is 4-bit with no known 16-bit original; pass --base_model_16bit "
                          f"or --base_gguf")
    return Plan(adapter_dir, export_dir, base, f"checking {ADAPTER_GGUF} on {check_on.name}; reference: {note}",
                dequantize, [], system, trained_on, ollama, check_on, config.convert_base)


def check_convertible(adapter_dir: Path) -> None:
    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    used = [what for key, what in UNSUPPORTED_LORA.items() if settings.get(key)]
    if used:
        raise ExportError(f"{adapter_dir}/adapter_config.json: {', '.join(used)} cannot be expressed as llama.cpp's "
                          f"LoRA (W + alpha / r * B @ A); export the merged model instead (drop --lora_only)")


def ollama_base(trained_on: str, given: str | None, converted: Path | None = None) -> str:
    """The adapter Modelfile's FROM: an Ollama model, or a base GGUF by its absolute path (Ollama reads a relative one
    from the Modelfile's folder). `converted`: the base GGUF --convert_base is to write beside the Modelfile, its FROM
    (`./base-f16.gguf`) where no Ollama model of the base is known, or where --ollama_base names that file."""
    beside = f"./{BASE_GGUF}"
    if given and given.lower().endswith(".gguf"):
        if converted is not None and Path(given).resolve() == converted.resolve():
            return beside
        if not Path(given).is_file():
            raise ExportError(f"--ollama_base {given}: no such file")
        return str(Path(given).resolve())
    if given or trained_on in OLLAMA_BASES:
        return given or OLLAMA_BASES[trained_on]
    if converted is not None:
        return beside
    raise ExportError(f"--ollama_base: no Ollama model known for the base {trained_on}; pass --ollama_base with an "
                      f"Ollama model of that base (ollama pull ...) or the path of a GGUF of it, or --convert_base "
                      f"to write one beside the Modelfile")


def trained_setting(adapter_dir: Path, name: str):
    """One setting of the training run (its config.yaml beside the adapter), or None without one."""
    saved = adapter_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        settings = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ExportError(f"{saved}: not valid YAML ({err}); fix or remove it") from None
    return settings.get(name) if isinstance(settings, dict) else None


def estimated_bytes(p: Plan, lora_only: bool) -> dict[str, int]:
    """Final size of every file the export will write, by name."""
    if lora_only:
        adapter = sum(f.stat().st_size for f in p.adapter_dir.iterdir() if f.name in ADAPTER_FILES)
        sizes = {"adapter": adapter, ADAPTER_GGUF: 2 * adapter}  # f32: at most twice a 16-bit adapter
        if p.base_gguf is not None:  # the check's reference: the merged model, on disk while the check runs
            sizes["the check's merged reference"] = 2 * parameter_count(p.base)
        return sizes | ({BASE_GGUF: 2 * parameter_count(p.base)} if p.convert_base else {})
    n = parameter_count(p.base)
    sizes = {"merged": 2 * n}
    sizes.update({p.gguf(t).name: int(n * GGUF_BITS[t] / 8) for t in p.gguf_types})
    return sizes


def check_disk_space(folder: Path, sizes: dict[str, int], margin: float = 1.1) -> None:
    """Fail before any work when the export's files would not fit beside the old export, which stays until the new one
    is complete (HF cache downloads not counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = int(sum(sizes.values()) * margin)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ExportError(f"{folder}: {needed / 2**30:.1f} GiB needed for {', '.join(sizes)} "
                          f"but only {free / 2**30:.1f} GiB free")


# ---------------------------------------------------------------- merge


def merge(adapter_dir: Path, base: str, target: Path, dequantize: bool = False) -> None:
    """Base + adapter merged in float16 safetensors shards, tensor by tensor (qlora/merge.py), with the tokenizer,
    config and generation config: the whole model is never in RAM. A 4-bit base without a known original is first
    dequantized on the GPU into a float16 copy beside `target`, removed after."""
    with atomic.atomic_dir(target) as tmp:
        try:
            if dequantize:
                source = target.with_name(f".{target.name}-base.tmp-{os.getpid()}")
                try:
                    merge_into(adapter_dir, dequantized_checkout(base, source), tmp)
                finally:
                    shutil.rmtree(source, ignore_errors=True)
            else:
                source = base_checkout(base, "base model")
                check_vocabulary(adapter_dir, base, source)
                merge_into(adapter_dir, source, tmp)
        except MergeError as err:
            raise ExportError(f"{err}; the old export is as it was") from None
        save_tokenizer(adapter_dir, base, tmp)


def check_vocabulary(adapter_dir: Path, base: str, base_dir: Path) -> None:
    """The base has as many token embeddings as the adapter's tokenizer has tokens: a base of another vocabulary (v1
    against v3 or Tekken) merges without an error into a model whose GGUF speaks another language."""
    tokenizer = prompt_tokenizer(adapter_dir, base)
    tokens = load_prompt_format(tokenizer).vocab_size
    embeddings = json.loads((base_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if embeddings not in (None, tokens):
        raise MergeError(f"{base_dir}: {embeddings} token embeddings, but the adapter was trained with {tokenizer} "
                         f"({tokens} tokens); pass --base_model_16bit with the base it was trained on")


def save_tokenizer(adapter_dir: Path, base: str, target: Path) -> None:
    """The adapter's tokenizer files (else the base's) plus the tokenizer file the prompts were rendered with, as it
    was: `tokenizer.model`, which transformers 5 does not write and without which llama.cpp's converter falls back on
    tokenizer.json and tokenizes unlike Mistral, or Tekken's `tokenizer.json`. Its chat template is ours, written for
    this tokenizer (`PromptFormat.chat_template`): the hub's Mistral templates give transformers and vLLM other ids
    than training (v0.2's joins each answer to `[/INST]` without SentencePiece's space, and refuses a system
    message)."""
    from transformers import AutoTokenizer

    from .runtimes import space_after_special

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    with fetching(source, "base model", LOCAL_BASE):
        tokenizer = AutoTokenizer.from_pretrained(source)
    rendered_with = prompt_tokenizer(adapter_dir, base)
    prompt_format = trained_prompt_format(adapter_dir, rendered_with)
    tokenizer.chat_template = prompt_format.chat_template(space_after_special(tokenizer, prompt_format))
    tokenizer.save_pretrained(target)
    shutil.copyfile(rendered_with, target / rendered_with.name)


def trained_prompt_format(adapter_dir: Path, tokenizer_file: Path) -> PromptFormat:
    """The renderer the adapter was trained with: its run's template (mistral unless config.yaml says otherwise)."""
    return load_prompt_format(tokenizer_file, trained_setting(adapter_dir, "template") or "mistral")


def prompt_tokenizer(adapter_dir: Path, base: str) -> Path:
    """The tokenizer file the adapter's training rendered with: the copy train_unsloth.py left beside it, else the
    base's."""
    return tokenizer_file_in(adapter_dir) or find_tokenizer_file(base, instead=LOCAL_BASE)


def copy_adapter(adapter_dir: Path, target: Path) -> None:
    with atomic.atomic_dir(target) as tmp:
        for f in adapter_dir.iterdir():
            if f.name in ADAPTER_FILES:
                shutil.copyfile(f, tmp / f.name)


# ---------------------------------------------------------------- GGUF


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
            if "Errno 28" in said or nearly_full(target):
                raise OSError(errno.ENOSPC, "No space left on device", str(target))  # said in one line by staged()
            raise ExportError(f"{target}: llama.cpp's {script} failed (exit {result.returncode})"
                              f"{': ' + said if said else ''}; {log_tail(log)}")


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


def modelfile_target(types: list[str]) -> str:
    return OLLAMA_PREFERRED if OLLAMA_PREFERRED in types else types[-1]


# ---------------------------------------------------------------- checks


def check_adapter(p: Plan, prompts: list[Conversation]) -> dict:
    """adapter.gguf on the base GGUF in llama.cpp against the merged model (streamed to a folder in the staging folder
    for the check, removed after): on an f16 (or f32) base it must match as an f16 file does; on a quantized base it
    is reported. Unchecked without a base GGUF."""
    from gguf import LlamaFileType

    entry = {"file": ADAPTER_GGUF, "type": f"lora {LORA_OUTTYPE}", "bytes": p.adapter_gguf.stat().st_size}
    if p.base_gguf is None:
        return entry | {"not_checked": "no base GGUF to apply it to (--base_gguf PATH or --convert_base)",
                        "problems": []}
    reference = p.folder / ".reference"
    merge(p.adapter_dir, p.base, reference, p.dequantize)
    try:
        checks = prompt_set(load_prompt_format(prompt_tokenizer(p.adapter_dir, p.base)), prompts)
        what = f"{ADAPTER_GGUF} on {p.base_gguf.name}"
        checked = check_all(reference, {what: (p.base_gguf_file, p.adapter_gguf)}, checks)[what]
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    entry |= {"base_gguf": str(p.base_gguf)} | checked
    if "metadata" in entry:
        entry["metadata"].pop("chat_template")  # the base's own: Ollama uses the Modelfile's TEMPLATE
        file_type = entry["metadata"]["file_type"]
        entry["base_type"] = LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
        entry["strict"] = entry["base_type"] in STRICT_BASE_TYPES
        entry["problems"] += mismatches(entry)
    return entry


def check_exports(p: Plan, prompt_format: PromptFormat, prompts: list[Conversation]) -> dict:
    """Every GGUF of the plan against the merged model (prompted as `prompt_format`, the merged folder's), then the
    runtimes users load the files into against the training ids; the report is written whatever the verdict."""
    checks = prompt_set(prompt_format, prompts)
    checked = check_all(p.merged_dir, {p.gguf(t).name: (p.gguf(t), None) for t in p.gguf_types}, checks)
    gguf_template = prompt_format.chat_template(space_after_special=False)
    files = [check_file(p.gguf(t), t, checked[p.gguf(t).name], gguf_template, prompt_format.vocab.gguf_tokenizer)
             for t in p.gguf_types]
    return write_report(p, files, check_runtimes(p, prompt_format, prompts))


def check_runtimes(p: Plan, prompt_format: PromptFormat, prompts: list[Conversation]) -> list[dict]:
    """transformers on the merged folder, llama.cpp (llama-cpp-python's formatter and llama-server) on the smallest
    GGUF (they share one template), Ollama's template engine on the Modelfile: each one's ids against training's."""
    conversations = runtimes.CONVERSATIONS + prompts
    smallest = min((p.gguf(t) for t in p.gguf_types), key=lambda f: f.stat().st_size)
    template = ollama_template(prompt_format)
    return [runtimes.check_transformers(p.merged_dir, prompt_format, conversations),
            runtimes.check_llama_cpp_python(smallest, prompt_format, conversations),
            runtimes.check_llama_server(smallest, prompt_format, conversations),
            runtimes.check_ollama(template, p.system_prompt, smallest, prompt_format, conversations)]


def write_report(p: Plan, files: list[dict], runtime_checks: list[dict] | None = None) -> dict:
    """The report, the export's last file: it vouches for the files beside it."""
    report = {"base": p.base, "base_note": p.base_note, "adapter_dir": str(p.adapter_dir),
              "criteria": {"near_tie": NEAR_TIE, "min_cosine_f16": MIN_COSINE, "greedy_steps": GREEDY_STEPS},
              "files": files, "runtimes": runtime_checks or []}
    atomic.write_text(p.folder / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def summary(file: dict) -> dict:
    """The worst figures over a file's prompts, for the table."""
    prompts = file["prompts"]
    splits = [m for m in prompts if m["split"] is not None]
    first = min(splits, key=lambda m: m["split"]) if splits else None
    return {"max_abs_diff": max(m["max_abs_diff"] for m in prompts), "cosine": min(m["cosine"] for m in prompts),
            "agreement": sum(m["agreement"] for m in prompts) / len(prompts),
            "split": first["split"] if first else None, "margin": first["margin_at_split"] if first else None}


def table(report: dict) -> str:
    rows = ["| file | MiB | max abs diff | cosine | greedy agreement | first split | HF margin there | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for f in report["files"]:
        name = f"{f['file']} on {Path(f['base_gguf']).name}" if "base_gguf" in f else f["file"]
        if "tensors" in f and "not_checked" not in f:
            verdict = "FAIL" if f["problems"] else f"ok: its {f['tensors']['compared']} tensors are the merged model's"
            rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | - | - | - | - | - | {verdict} ({f['llama_cpp']}) |")
            continue
        if "prompts" not in f:
            rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | - | - | - | - | - | not checked: {f['not_checked']} |")
            continue
        s = summary(f)
        verdict = "FAIL" if f["problems"] else "ok" if f["strict"] else "reported"
        margin = "-" if s["margin"] is None else f"{s['margin']:.4f}"
        rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | {s['max_abs_diff']:.4f} | {s['cosine']:.6f} | "
                    f"{s['agreement']:.1%} | {'-' if s['split'] is None else s['split']} | {margin} | {verdict} |")
    return "\n".join(rows)


def runtime_lines(report: dict) -> str:
    """One line a runtime: how many conversations it renders to the training ids (see qlora/runtimes.py)."""
    lines = ["runtimes (the ids each gives a conversation, against training's):"]
    for r in report["runtimes"]:
        if "not_checked" in r:
            lines.append(f"  {r['runtime']}: not checked: {r['not_checked']}")
            continue
        status = "FAIL" if r["problems"] else "ok"
        edges = f"; {r['edges']} differ only at a known edge: {r['edge_note']}" if r["edges"] else ""
        lines.append(f"  {r['runtime']}: {status}, {r['equal']} of {r['conversations']} conversations{edges}")
    return "\n".join(lines)


def verdict(report: dict) -> None:
    """Raise when llama.cpp died in a check (the files stay; the message names them, the signal and the rebuild), on
    an f16 file that disagrees with the merged model, or on any file with a tokenizer/metadata fault."""
    crashed = [f for f in report["files"] if "signal" in f]
    problems = [f"{f['file']}: {why}" for f in report["files"] for why in f["problems"]]
    problems += [why for r in report["runtimes"] for why in r["problems"]]
    also = f"; also {problems[0]} ({len(problems)} problem(s))" if problems else ""
    if crashed:
        raise ExportError(f"{', '.join(f['not_checked'] for f in crashed)}: the GGUF files are written, the checks "
                          f"that could not run are marked in export_report.json{also}; rebuild llama-cpp-python for "
                          f"this CPU with `{isolate.REBUILD_LLAMA_CPP}`")
    if problems:
        raise ExportError(f"{problems[0]} ({len(problems)} problem(s); see export_report.json)")


# ---------------------------------------------------------------- the whole export


def check_gpu(needed: bool) -> None:
    """Before anything is fetched: a merge that needs the GPU stops without one, naming an NVIDIA GPU that torch
    cannot use; an export that runs on the CPU only says so."""
    from .gpu import unusable_gpu
    from .device import cuda_available, note

    if cuda_available():
        return
    problem = unusable_gpu()
    if needed:
        raise ExportError(f"dequantizing a 4-bit base needs a CUDA GPU: {problem or 'this machine has none'}; or pass "
                          f"--base_model_16bit with its 16-bit original")
    if problem:
        note(problem, "the export runs on the CPU")


def run_export(config: Config, prompts: list[Conversation] = CHECK_PROMPTS) -> Plan:
    p = plan(config)
    check_gpu(p.dequantize and not config.lora_only)
    with runfolder.locked(p.export_dir):  # one export at a time into a folder
        return export_planned(config, p, prompts)


def export_planned(config: Config, p: Plan, prompts: list[Conversation]) -> Plan:
    needed = LORA_CONVERTER if config.lora_only else HF_CONVERTER if p.gguf_types else None
    converter = find_converter(needed) if needed else None
    print(p.base_note, flush=True)
    atomic.check_writable(p.export_dir)
    check_disk_space(p.export_dir, estimated_bytes(p, config.lora_only))
    with staged(p.export_dir) as p.work_dir:
        atomic.write_text(p.folder / "config.yaml", to_yaml(config))
        if config.lora_only:
            report = export_adapter(p, converter, prompts)
        else:
            report = export_merged(p, converter, config.merged_only, prompts)
    p.work_dir = None
    if report is not None:
        print(table(report), flush=True)
        if report["runtimes"]:
            print(runtime_lines(report), flush=True)
        verdict(report)
        modelfile_from = None if config.lora_only else p.gguf(modelfile_target(p.gguf_types)).name
        print(closing_summary(p.export_dir, p.adapter_dir, report, modelfile_from), flush=True)
    return p


def export_merged(p: Plan, converter: Path | None, merged_only: bool, prompts: list[Conversation]) -> dict | None:
    """The merged folder, the GGUF files, the Modelfile, then the report (None with --merged_only)."""
    merge(p.adapter_dir, p.base, p.merged_dir, p.dequantize)
    if merged_only:
        return None
    prompt_format = trained_prompt_format(p.adapter_dir, tokenizer_file_in(p.merged_dir))
    convert_f16(p.merged_dir, p.gguf("f16"), converter, prompt_format.chat_template(space_after_special=False))
    for t in p.gguf_types[1:]:
        quantize(p.gguf("f16"), p.gguf(t), t)
    atomic.write_text(p.folder / "Modelfile", modelfile(f"./{p.gguf(modelfile_target(p.gguf_types)).name}",
                                                        p.system_prompt, template=ollama_template(prompt_format)))
    return check_exports(p, prompt_format, prompts)


def export_adapter(p: Plan, converter: Path, prompts: list[Conversation]) -> dict:
    """--lora_only: the PEFT adapter copied, adapter.gguf, its Modelfile, then (when asked) its check in llama.cpp."""
    copy_adapter(p.adapter_dir, p.folder / "adapter")
    convert_lora(p.adapter_dir, p.trained_on, p.adapter_gguf, converter)
    prompt_format = trained_prompt_format(p.adapter_dir, prompt_tokenizer(p.adapter_dir, p.trained_on))
    template = ollama_template(prompt_format)
    atomic.write_text(p.folder / "Modelfile", modelfile(p.ollama_base, p.system_prompt, ADAPTER_GGUF, template))
    # a base GGUF carries its own template (v0.2's gives other ids than training): llama-server takes this one instead
    gguf_template = prompt_format.chat_template(space_after_special=False)
    atomic.write_text(p.folder / LLAMA_CPP_TEMPLATE, gguf_template)
    if p.convert_base:
        convert_f16(base_checkout(p.base, "--convert_base"), p.base_gguf_file, converter, gguf_template)
    return write_report(p, [check_adapter(p, prompts)])


@contextmanager
def staged(export_dir: Path):
    """A fresh staging folder beside `export_dir`, swapped in for it when the block ends without error (else removed):
    the export is all new or all old. The old folder's other files (the user's own, a base GGUF) are carried over into
    the new one first, by hard links; its export outputs are not (they belong to the old adapter)."""
    atomic.recover_dir(export_dir)
    atomic.remove_stale_temporaries(export_dir.parent, prefix=f".{export_dir.name}")
    with atomic.atomic_dir(export_dir) as staging:
        try:
            yield staging
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise ExportError(f"{err.filename or staging}: {err.strerror}; free some space (df -h {export_dir.parent}) "
                              f"and export again; the old export is as it was") from None
        carry_over(export_dir, staging)


def carry_over(old: Path, new: Path) -> None:
    if not old.is_dir():
        return
    for item in old.iterdir():
        ours = is_export_output(item.name)
        if ours or (new / item.name).exists() or ".tmp-" in item.name:
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name, copy_function=os.link, symlinks=True)
        else:
            os.link(item, new / item.name, follow_symlinks=False)
