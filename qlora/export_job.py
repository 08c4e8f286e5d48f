"""What an export writes where (`ExportJob`), decided from the settings and the adapter before anything is fetched or
written: the base merged into (or checked on), the GGUF types, the Modelfile's FROM and SYSTEM, the files' names in the
export folder; and `ExportError`, which every step of the export stops with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import FIELDS, Config, ConfigError, is_dump, saved_settings
from .hub import LOCAL_BASE, fetching, parameter_count
from .model import adapter_base, check_safetensors_adapter

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
# Ollama library models of known bases (a 4-bit repo's by its 16-bit original, KNOWN_16BIT): the adapter's Modelfile
# FROM when --ollama_base is not given.
OLLAMA_BASES = {"mistralai/Mistral-7B-Instruct-v0.2": "mistral:7b-instruct-v0.2",
                "mistralai/Mistral-7B-Instruct-v0.3": "mistral:v0.3",
                "mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo:12b"}
# adapter_config.json settings that llama.cpp's LoRA (W + alpha / r * B @ A on each matrix) cannot express
UNSUPPORTED_LORA = {"use_dora": "DoRA", "use_rslora": "rsLoRA's alpha / sqrt(r) scale",
                    "alpha_pattern": "per-module alpha", "modules_to_save": "fully trained modules"}

# The export's adapter/ folder (--lora_only): the PEFT adapter and its tokenizer files, copied from the training folder
ADAPTER_FOLDER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
REPORT = "export_report.json"
LOG = "llama.cpp.log"  # llama.cpp's converter and quantizer output, in the export folder
# What an export writes: a re-export drops the old export's files of these names (they would be taken for the new
# adapter's); anything else in the old folder (the user's own files, a base GGUF) is carried over into the new one.
# Its model card, README.md, is not among them: a README.md of the user's stays, and the export then writes none.
LLAMA_CPP_TEMPLATE = "chat_template.jinja"  # beside adapter.gguf: the template for llama-server --chat-template-file
EXPORT_OUTPUTS = ("merged", "adapter", ADAPTER_GGUF, LLAMA_CPP_TEMPLATE, "Modelfile", "config.yaml", REPORT, LOG,
                  "loss.png")  # loss.png: the training run's plot, beside the card


class ExportError(RuntimeError):
    """An export that cannot go on: the message names the file or setting and what to do."""


@dataclass
class ExportJob:
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


def job_for(config: Config) -> ExportJob:
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
        return adapter_job(config, adapter_dir, export_dir, system)
    base, dequantize, note = resolve_base(adapter_dir, config.base_model_16bit)
    return ExportJob(adapter_dir, export_dir, base, note, dequantize, [] if config.merged_only else types, system)


def resolve_base(adapter_dir: Path, base_model_16bit: str | None) -> tuple[str, bool, str]:
    """(base to merge into, whether it must be dequantized, a sentence saying which and why)."""
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


def modelfile_target(types: list[str]) -> str:
    return OLLAMA_PREFERRED if OLLAMA_PREFERRED in types else types[-1]


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


def adapter_job(config: Config, adapter_dir: Path, export_dir: Path, system: str | None) -> ExportJob:
    """--lora_only: adapter.gguf and its Modelfile; checked in llama.cpp on a base GGUF given or converted. Without a
    check the base's weights are neither read nor downloaded."""
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
        return ExportJob(adapter_dir, export_dir, trained_on, note, False, [], system, trained_on, ollama)
    base, dequantize, note = resolve_base(adapter_dir, config.base_model_16bit)
    if dequantize and config.convert_base:
        raise ExportError(f"--convert_base: {base} is 4-bit with no known 16-bit original; pass --base_model_16bit "
                          f"or --base_gguf")
    return ExportJob(adapter_dir, export_dir, base, f"checking {ADAPTER_GGUF} on {check_on.name}; reference: {note}",
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
    known = OLLAMA_BASES.get(KNOWN_16BIT.get(trained_on, trained_on))
    if given or known:
        return given or known
    if converted is not None:
        return beside
    raise ExportError(f"--ollama_base: no Ollama model known for the base {trained_on}; pass --ollama_base with an "
                      f"Ollama model of that base (ollama pull ...) or the path of a GGUF of it, or --convert_base "
                      f"to write one beside the Modelfile")


def trained_setting(adapter_dir: Path, name: str):
    """One setting of the training run (its config.yaml beside the adapter), or None without one."""
    try:
        settings = saved_settings(adapter_dir / "config.yaml")
    except ConfigError as err:
        raise ExportError(f"{err}; fix or remove it") from None
    return settings.get(name) if settings else None


def estimated_bytes(job: ExportJob, lora_only: bool) -> dict[str, int]:
    """Final size of every file the export will write, by name."""
    if lora_only:
        adapter = sum(f.stat().st_size for f in job.adapter_dir.iterdir() if f.name in ADAPTER_FOLDER_FILES)
        sizes = {"adapter": adapter, ADAPTER_GGUF: 2 * adapter}  # f32: at most twice a 16-bit adapter
        if job.base_gguf is not None:  # the check's reference: the merged model, on disk while the check runs
            sizes["the check's merged reference"] = 2 * parameter_count(job.base)
        return sizes | ({BASE_GGUF: 2 * parameter_count(job.base)} if job.convert_base else {})
    n = parameter_count(job.base)
    sizes = {"merged": 2 * n}
    sizes.update({job.gguf(t).name: int(n * GGUF_BITS[t] / 8) for t in job.gguf_types})
    return sizes
