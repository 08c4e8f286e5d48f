"""One typed config for every script: the reference recipe as defaults, YAML presets, flags named like fields.

Each field names the scripts that read it: a script's flags are exactly those fields (`SCRIPTS`), with the help text
and choices beside each field. Its `group` (data, base, model, train, export, infer) is the part of the recipe it
belongs to: the data and base groups are what prepared data depends on, the infer group the sampling.
Numbers and names carry a `check`, run on every value from a file or a flag, before anything is fetched or loaded.
Precedence: dataclass default < `--config file.yaml` < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

@dataclass(frozen=True)
class Check:
    """What a field's values must be: `ok(value)` says whether one is, `must` says what, for the error line."""

    ok: Callable[[object], bool]
    must: str


def at_least(low: int) -> Check:
    return Check(lambda v: math.isfinite(v) and v >= low, f"at least {low}")


def above(low: float) -> Check:
    return Check(lambda v: math.isfinite(v) and v > low, f"above {low}")


SHARE = Check(lambda v: 0 <= v < 1, "at least 0 and below 1")


def transformers_name(module: str, names: str, *also: str, must: str) -> Check:
    """One of `also` or of the names in transformers' enum `module.names` (imported only for a value not in `also`:
    importing transformers takes seconds)."""
    def ok(value) -> bool:
        return value in also or value in {n.value for n in getattr(importlib.import_module(module), names)}

    return Check(ok, must)


def hub_repo_id(value: str) -> bool:
    """Whether `value` is a repository id the hub takes (huggingface_hub imported only when a value is checked)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# an empty path is the folder a script runs in (often an unset shell variable): never what was meant
PATH = Check(lambda v: v.strip() != "", "a path, not empty (an unset variable?)")
# a value written into a line of a generated file (the Modelfile's FROM): a newline would add lines of its own
ONE_LINE = Check(lambda v: v.strip() != "" and v.isprintable(), "one line of printable text")
# a model repository to upload to: `name` (in the token's own namespace) or `namespace/name`
REPO_ID = Check(hub_repo_id, "a Hugging Face repository id (namespace/name)")
SEED = Check(lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1")  # what numpy's and torch's seeding take
STEPS = Check(lambda v: v == -1 or v >= 1, "-1 (run the epochs) or at least 1")
NUCLEUS = Check(lambda v: 0 < v <= 1, "above 0 and at most 1")
OPTIMIZER = transformers_name("transformers.training_args", "OptimizerNames", "auto",
                              must="auto or an optimizer of transformers (adamw_torch, adamw_torch_fused, adamw_8bit, "
                                   "adafactor, ...)")
SCHEDULE = transformers_name("transformers.trainer_utils", "SchedulerType", "linear",
                             must="a schedule of transformers (linear, cosine, constant, constant_with_warmup, ...)")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The scripts, by the names `parse`, `build_parser` and `show` take: data_prep.py, train_unsloth.py, export_gguf.py,
# infer.py. Each field names the scripts whose code reads it; those, and only those, offer it as a flag
# (tests/test_script_flags.py holds each script's reads against its flags).
DATA_PREP, TRAIN, EXPORT, INFER = "data_prep", "train", "export", "infer"


def _f(default, group: str, scripts: tuple[str, ...], help: str, check: Check | None = None,
       choices: tuple[str, ...] | None = None):
    """A dataclass field with its group, the scripts that read it, its help text, its choices where it has a few,
    and, for numbers and names, the check its values must pass; lists get a factory so instances never share one."""
    meta = {"group": group, "scripts": scripts, "help": help, "check": check, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # data: what the rows are and how they are rendered; data_prep.py prepares them, train_unsloth.py too when given
    # raw data
    dataset: str = _f("mlabonne/guanaco-llama2-1k", "data", (DATA_PREP, TRAIN), "hub id, local "
                      ".jsonl/.json/.csv/.parquet file, or a data_prep output folder", check=PATH)
    dataset_split: str = _f("train", "data", (DATA_PREP, TRAIN), "split to read from a hub dataset")
    dataset_format: str = _f("auto", "data", (DATA_PREP, TRAIN), "auto, llama2, guanaco, alpaca, dolly, "
                             "question_answer, messages, sharegpt, prompt_completion; preference pairs: preference "
                             "(prompt, chosen, rejected: texts or TRL's message lists), preference_conversations "
                             "(chosen and rejected whole conversations sharing their prompt), hh (Anthropic HH's "
                             "Human/Assistant texts)",
                             choices=("auto", "llama2", "guanaco", "alpaca", "dolly", "question_answer", "messages",
                                      "sharegpt", "prompt_completion", "preference", "preference_conversations", "hh"))
    prompt_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "column holding the prompt: with "
                                  "--response_field, reads rows of any other shape by column names")
    response_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "column holding the answer (with "
                                    "--prompt_field)")
    chosen_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "preference pairs: column holding the preferred "
                                  "answer (with --prompt_field and --rejected_field)")
    rejected_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "preference pairs: column holding the rejected "
                                    "answer (with --prompt_field and --chosen_field)")
    input_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "column whose text goes after the prompt, after "
                                 "a blank line, as Alpaca's input (optional)")
    system_field: str | None = _f(None, "data", (DATA_PREP, TRAIN), "column holding a system message for the row "
                                  "(optional)")
    template: str = _f("mistral", "data", (DATA_PREP, TRAIN, INFER), "mistral ([INST] chat format, Mistral's own "
                       "token ids) or instruction (### Instruction / ### Response); infer.py takes the training "
                       "run's where it finds the run's config.yaml", choices=("mistral", "instruction"))
    system_prompt: str | None = _f(None, "data", (DATA_PREP, TRAIN, EXPORT), "system message of every row without "
                                   "one (placed as the model's tokenizer does: v1 in the first user turn, v3 and "
                                   "Tekken in the last); export_gguf.py: the Modelfile's SYSTEM, the training run's "
                                   "when not given")
    train_on_prompt: bool = _f(False, "data", (DATA_PREP, TRAIN), "train on the whole text instead of on the "
                               "responses only")
    max_seq_length: int = _f(2048, "data", (DATA_PREP, TRAIN), "rows longer than this are truncated",
                             check=at_least(1))
    eval_fraction: float = _f(0.05, "data", (DATA_PREP, TRAIN), "share of rows held out for evaluation", check=SHARE)
    skip_invalid: bool = _f(False, "data", (DATA_PREP, TRAIN), "count and drop unreadable rows instead of stopping "
                            "at the first")
    seed: int = _f(42, "data", (DATA_PREP, TRAIN), "seed for the split, LoRA init and data order", check=SEED)
    # base: the model whose tokenizer every script renders prompts with
    model_name: str = _f("unsloth/mistral-7b-instruct-v0.2-bnb-4bit", "base", (DATA_PREP, TRAIN, INFER), "hub id or "
                         "local folder of the base model", check=PATH)
    tokenizer_name: str | None = _f(None, "base", (DATA_PREP, TRAIN, INFER), "hub id or folder holding "
                                    "tokenizer.model (or Tekken's tokenizer.json), when the model's lacks it",
                                    check=PATH)
    # model
    backend: str = _f("auto", "model", (TRAIN, INFER), "auto (Unsloth on a CUDA GPU, transformers there where "
                      "Unsloth is not installed; the CPU otherwise), unsloth, hf (transformers+bitsandbytes+PEFT), "
                      "cpu; infer.py runs a .gguf in llama.cpp whatever it is",
                      choices=("auto", "unsloth", "hf", "cpu"))
    init_adapter: str | None = _f(None, "model", (TRAIN,), "with --method dpo or orpo: go on training the LoRA "
                                  "adapter of this SFT run (its output folder); it must have been trained on "
                                  "--model_name with the same tokenizer. Without it, a new adapter on the base",
                                  check=PATH)
    load_in_4bit: bool = _f(True, "model", (TRAIN,), "load the base in 4 bits (GPU backends only)")
    lora_r: int = _f(8, "model", (TRAIN,), "LoRA rank", check=at_least(1))
    lora_alpha: int = _f(32, "model", (TRAIN,), "LoRA alpha", check=at_least(1))
    lora_dropout: float = _f(0.0, "model", (TRAIN,), "LoRA dropout (0 keeps Unsloth's fastest LoRA kernels; 0.1 costs "
                             "about 7%)", check=SHARE)
    lora_target_modules: list[str] = _f(LORA_TARGETS, "model", (TRAIN,), "modules that get LoRA adapters")
    gradient_checkpointing: str = _f("auto", "model", (TRAIN,), "recompute activations in the backward pass to save "
                                     "memory: true, false, unsloth (offload them to host memory instead) or auto (the "
                                     "planner picks the fastest that fits the free GPU memory)",
                                     choices=("auto", "true", "false", "unsloth"))
    checkpoint_skip_layers: int | str = _f("auto", "model", (TRAIN,), "with gradient_checkpointing true on Unsloth: "
                                           "this many of the decoder layers keep their activations instead of "
                                           "recomputing them (faster, more memory); auto: as many as fit the free GPU "
                                           "memory", check=at_least(0))
    # train
    method: str = _f("sft", "train", (TRAIN,), "sft (supervised, on instruction rows), dpo or orpo (preference "
                     "tuning, on pairs of a chosen and a rejected answer)", choices=("sft", "dpo", "orpo"))
    beta: float = _f(0.1, "train", (TRAIN,), "dpo: how far the model may move from the reference (larger: less far); "
                     "orpo: the weight of the odds-ratio term beside the chosen answer's loss", check=above(0))
    output_dir: str = _f("outputs/mistral-qlora", "train", (DATA_PREP, TRAIN, EXPORT), "where data, checkpoints, "
                         "adapter and reports go; export_gguf.py exports the adapter there unless --adapter_dir is "
                         "given", check=PATH)
    per_device_train_batch_size: int = _f(1, "train", (TRAIN,), "rows per micro-batch (per device), when "
                                          "token_budget is unset", check=at_least(1))
    token_budget: int | str | None = _f("auto", "train", (TRAIN,), "micro-batches of rows of similar length holding "
                                        "up to this many padded tokens (none: per_device_train_batch_size rows); "
                                        "auto: the planner cuts tokens_per_step into micro-batches that fit the free "
                                        "GPU memory", check=at_least(1))
    tokens_per_step: int = _f(12288, "train", (TRAIN,), "padded tokens per optimizer step when token_budget is auto",
                              check=at_least(1))
    calibrate: bool = _f(True, "train", (TRAIN,), "with the planner on Unsloth: measure this GPU's speed at the start "
                         "(a few seconds, once per card: cached in ~/.cache/qlora-mistral) and plan from it; false: "
                         "plan from built-in figures")
    pad_to_multiple_of: int | None = _f(8, "train", (TRAIN,), "pad each micro-batch's length up to a multiple of this "
                                        "(PyTorch's memory-efficient attention wants 8; none: to the longest row)",
                                        check=at_least(1))
    gradient_accumulation_steps: int = _f(1, "train", (TRAIN,), "micro-batches per optimizer step (one process)",
                                          check=at_least(1))
    keep_gradient_accumulation: bool = _f(False, "train", (TRAIN,), "with N processes keep the accumulation as given "
                                          "instead of dividing it by N to keep the one-process effective batch")
    learning_rate: float = _f(2e-4, "train", (TRAIN,), "peak learning rate", check=above(0))
    num_train_epochs: float = _f(3.0, "train", (TRAIN,), "epochs over the training split", check=above(0))
    max_steps: int = _f(-1, "train", (TRAIN,), "stop after this many optimizer steps (-1: run the epochs)",
                        check=STEPS)
    lr_scheduler_type: str = _f("linear", "train", (TRAIN,), "learning-rate schedule", check=SCHEDULE)
    warmup_steps: float = _f(0.03, "train", (TRAIN,), "warm-up: a number of steps, or a share of all steps when "
                             "below 1", check=at_least(0))
    weight_decay: float = _f(0.0, "train", (TRAIN,), "AdamW weight decay", check=at_least(0))
    optim: str = _f("auto", "train", (TRAIN,), "optimizer: auto (adamw_torch_fused on GPU, adamw_torch on CPU) or any "
                    "transformers name", check=OPTIMIZER)
    packing: bool = _f(False, "train", (TRAIN,), "pack several rows per sequence, padding-free, no attention across "
                       "rows")
    logging_steps: int = _f(10, "train", (TRAIN,), "log every N optimizer steps", check=at_least(1))
    save_steps: int = _f(100, "train", (TRAIN,), "checkpoint every N optimizer steps", check=at_least(1))
    save_total_limit: int = _f(3, "train", (TRAIN,), "checkpoints kept", check=at_least(1))
    eval_steps: int | None = _f(None, "train", (TRAIN,), "evaluate every N steps (default: as save_steps)",
                                check=at_least(1))
    early_stopping_patience: int | None = _f(None, "train", (TRAIN,), "stop after N evaluations without a better "
                                             "eval loss", check=at_least(1))
    report_to: str = _f("none", "train", (TRAIN,), "none, tensorboard or wandb")
    profile_steps: int = _f(0, "train", (TRAIN,), "profile this many steps after 3 warm-up ones into "
                            "output_dir/profile.txt and profile.trace.json.gz", check=at_least(0))
    sample_count: int = _f(3, "train", (TRAIN,), "held-out prompts of the eval split answered greedily at the start "
                           "and at each evaluation, into the log and metrics.json (0: no samples)", check=at_least(0))
    sample_prompts: str | None = _f(None, "train", (TRAIN,), "answer these prompts instead, all of them: a text "
                                    "file of one prompt a line, or a .jsonl/.json/.csv/.parquet file in any format "
                                    "data_prep reads (its answers become the references) or of {\"prompt\": ...} "
                                    "rows", check=PATH)
    sample_max_new_tokens: int = _f(64, "train", (TRAIN,), "tokens each sample answer gets at most",
                                    check=at_least(1))
    resume: bool = _f(False, "train", (TRAIN,), "continue from the last complete checkpoint in output_dir")
    resume_from_checkpoint: str | None = _f(None, "train", (TRAIN,), "continue from this checkpoint folder",
                                            check=PATH)
    overwrite_output_dir: bool = _f(False, "train", (TRAIN,), "replace a finished run in output_dir: its files go "
                                    "once the new run's settings, data and model are ready; other files there stay")
    push_to_hub: str | None = _f(None, "train", (TRAIN, EXPORT), "once every file is written: upload the adapter and "
                                 "its model card (train_unsloth.py), or the export's files and its card "
                                 "(export_gguf.py), to this Hugging Face model repository, made if missing; the token "
                                 "is HF_TOKEN's or `hf auth login`'s", check=REPO_ID)
    hub_private: bool = _f(True, "train", (TRAIN, EXPORT), "with --push_to_hub: make the repository private (one that "
                           "exists keeps its visibility)")
    # export
    adapter_dir: str | None = _f(None, "export", (EXPORT,), "training output or adapter folder to merge (default: "
                                 "output_dir)", check=PATH)
    export_dir: str | None = _f(None, "export", (EXPORT,), "where merged model, GGUF files and Modelfile go "
                                "(default: adapter_dir/export)", check=PATH)
    base_model_16bit: str | None = _f(None, "export", (EXPORT,), "16-bit base to merge into (default: the known "
                                      "original of a -bnb-4bit repo)", check=PATH)
    gguf_types: list[str] = _f(["f16", "q8_0", "q4_k_m", "q5_k_m"], "export", (EXPORT,), "GGUF files to write (f16 is "
                               "always written first)")
    merged_only: bool = _f(False, "export", (EXPORT,), "stop after the merged 16-bit safetensors")
    lora_only: bool = _f(False, "export", (EXPORT,), "no merge: write the adapter as adapter.gguf with a Modelfile "
                         "that puts it on a base llama.cpp (or Ollama up to 0.34.0) already has")
    ollama_base: str | None = _f(None, "export", (EXPORT,), "with --lora_only: the Modelfile's FROM, an Ollama model "
                                 "of the base or the path of a GGUF of it (default: the Ollama tag of a known base, "
                                 "mistral:7b-instruct-v0.2 for the default base)", check=ONE_LINE)
    base_gguf: str | None = _f(None, "export", (EXPORT,), "with --lora_only: a GGUF of the base to check adapter.gguf "
                               "on in llama.cpp (an f16 base must match the merged model, a quantized one is "
                               "reported)", check=PATH)
    convert_base: bool = _f(False, "export", (EXPORT,), "with --lora_only: convert the 16-bit base to base-f16.gguf "
                            "and check adapter.gguf on it (downloads the base)")
    # infer
    max_new_tokens: int = _f(256, "infer", (INFER,), "tokens to generate at most", check=at_least(1))
    temperature: float = _f(0.7, "infer", (INFER,), "sampling temperature; 0 is greedy", check=at_least(0))
    top_p: float = _f(0.95, "infer", (INFER,), "nucleus sampling", check=NUCLEUS)
    top_k: int = _f(50, "infer", (INFER,), "top-k sampling", check=at_least(0))
    repetition_penalty: float = _f(1.0, "infer", (INFER,), "penalty for repeated tokens", check=above(0))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
CHOICES = {name: f.metadata["choices"] for name, f in FIELDS.items() if f.metadata["choices"]}
# Each script's flags: the fields it reads, in the order they are declared (and printed)
SCRIPTS = {script: tuple(name for name, f in FIELDS.items() if script in f.metadata["scripts"])
           for script in (DATA_PREP, TRAIN, EXPORT, INFER)}


AUTO_NUMBERS = ("token_budget", "checkpoint_skip_layers")  # numbers that also take "auto"


class ConfigError(ValueError):
    """A setting that cannot be used: the message names the key and, where it came from a file, the file."""


def _base_type(tp):
    """`int | None` -> (int, True); `int | str` (a number or auto) -> (int, False); `list[str]` -> (list, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in args if a is not type(None)][0], type(None) in args
    return tp, False


def coerce(name: str, value, source: str = "flag"):
    """Check (and for strings from the command line, convert) one value against its field's type and its check."""
    value = _typed(name, value, source)
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and not _encodable(text):  # a lone surrogate: bytes that were not UTF-8, or "\ud800"
            raise ConfigError(f"{source}: '{name}' holds text that is not valid UTF-8 ({ascii(text)}); give it again")
    check = FIELDS[name].metadata["check"]
    if check and value is not None and not (value == "auto" and name in AUTO_NUMBERS) and not check.ok(value):
        raise ConfigError(f"{source}: '{name}' must be {check.must}, got {value!r}")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _typed(name: str, value, source: str):
    if name not in FIELDS:
        raise ConfigError(f"{source}: unknown key '{name}'")
    tp, optional = _base_type(typing.get_type_hints(Config)[name])
    if value == "auto" and name in AUTO_NUMBERS:
        return value
    if value is None or (optional and value in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' may not be empty")
    origin = typing.get_origin(tp)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{source}: '{name}' must be a list of strings, got {value!r}")
        return [v for item in items for v in item.replace(",", " ").split()]  # `a b`, `a,b` and `a, b` alike
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{name}' must be true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{source}: '{name}' must be {tp.__name__}, got {value!r}") from None
    if tp is str and isinstance(value, bool) and name in CHOICES:  # YAML reads `false` as a boolean
        value = str(value).lower()
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{name}' must be {tp.__name__}, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{source}: '{name}' must be one of {', '.join(CHOICES[name])}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --config takes a YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML file (bytes that are not UTF-8 at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {k: coerce(k, v, str(path)) for k, v in data.items()}


def saved_settings(path: str | Path) -> dict | None:
    """The settings a run, an export or data_prep saved (its config.yaml), read and checked as a preset is, or None
    where there is no such file. Raises ConfigError, naming the file, where it holds no settings."""
    return load_yaml(path) if Path(path).is_file() else None


def build_parser(script: str, description: str) -> argparse.ArgumentParser:
    """--config and a flag for each field `script` (a key of SCRIPTS) reads."""
    # Raw description: the scripts' docstrings hold usage examples, one a line, that argparse would run together
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset; flags given here win over it")
    for name in SCRIPTS[script]:
        f = FIELDS[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tp, _ = _base_type(typing.get_type_hints(Config)[name])
        # SUPPRESS: a flag not given stays out of the namespace, so the YAML file's value is not overwritten
        # a help text that says its own default ("default: as save_steps") gets no "(default: None)" after it
        help_text = f.metadata["help"]
        if "(default:" not in help_text:
            help_text += f" (default: {default})"
        # argparse %-formats help texts: a literal % ("about 7%") must be doubled
        help_text = help_text.replace("%", "%%")
        kwargs = {"help": help_text, "default": argparse.SUPPRESS}
        if tp is bool:  # `--packing` alone means true; `--packing false` is accepted too (TRL's convention)
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+")
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """Dataclass defaults, then the YAML file, then the flags that were given; the config remembers which gave what
    (`given_by`)."""
    preset = getattr(args, "config", None)
    values = load_yaml(preset) if preset else {}
    sources = dict.fromkeys(values, preset)
    for name, value in vars(args).items():
        if name != "config":
            values[name] = coerce(name, value, f"--{name}")
            sources[name] = f"--{name}"
    config = Config(**values)
    config._given_by = sources  # not a setting: where settings came from, for error lines that name it
    return config


def given_by(config: Config, name: str) -> str:
    """Where a setting's value came from: `--name`, or the --config file that set it (for a config built in code, or
    copied with dataclasses.replace, `--name`)."""
    return getattr(config, "_given_by", {}).get(name, f"--{name}")


def parse(script: str, description: str, argv: list[str] | None = None, extra=None):
    """Parse a script's command line into a Config; `extra(parser)` adds script-only arguments (positional paths).

    Returns (config, namespace of the extra arguments)."""
    parser = build_parser(script, description)
    extra_names = set()
    if extra:
        before = {a.dest for a in parser._actions}
        extra(parser)
        extra_names = {a.dest for a in parser._actions} - before
    args = parser.parse_args(argv)
    extras = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in extra_names})
    for k in extra_names:
        if hasattr(args, k):
            delattr(args, k)
    try:
        return resolve(args), extras
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def is_dump(path: str | Path) -> bool:
    """Whether `path` is settings as `to_yaml` writes them (a run's or an export's config.yaml, of this version or an
    older one): every key a setting, among them those every version wrote, and nothing a person adds (comments, an
    order or style of their own). A user's preset is not, and is never replaced."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        settings = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return (isinstance(settings, dict) and {"dataset", "model_name", "output_dir", "lora_r"} <= settings.keys() <=
            FIELDS.keys() and yaml.safe_dump(settings, sort_keys=False) == text)


def show(config: Config, script: str) -> None:
    """Print the resolved settings a script uses, one per line, so every log starts with what was run."""
    print("resolved config:")
    for name in SCRIPTS[script]:
        print(f"  {name}: {getattr(config, name)}")
    sys.stdout.flush()
