"""--init_adapter: DPO or ORPO go on from an SFT run's LoRA adapter. Checked before anything is loaded or written:
the folder holds a whole, finite safetensors adapter trained on this --model_name, with the same tokenizer file; its
LoRA shape (rank, alpha, target modules) becomes the run's. qlora/model.py loads its weights into the new adapter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .chat import find_tokenizer_file
from .config import Config
from .errors import RunError
from .export_job import KNOWN_16BIT
from .model import WeightsError, adapter_base, check_safetensors_adapter


# adapter_config.json fields and the values this toolkit's adapters have (PEFT's defaults)
UNSUPPORTED = {"use_rslora": (False, None), "use_dora": (False, None), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "modules_to_save": (None, []), "layers_to_transform": (None,),
               "bias": ("none", None)}
TOOLKIT_ADAPTERS = "the adapters this toolkit trains never have (r, alpha and target modules alone)"


def with_init_adapter(config: Config) -> Config:
    """`config` with the LoRA shape of --init_adapter's adapter, once it is checked; as it is without one."""
    if not config.init_adapter:
        return config
    if config.method == "sft":
        raise RunError("--init_adapter is for --method dpo or orpo; to train an SFT run further, resume it "
                       "(--resume_from_checkpoint with one of its checkpoints)")
    folder = Path(config.init_adapter)
    check_folder(folder, Path(config.output_dir))
    try:
        check_safetensors_adapter(folder)
        base = adapter_base(folder)
    except (FileNotFoundError, WeightsError) as err:
        raise RunError(f"--init_adapter {err}") from None
    if not same_model(base, config.model_name):
        raise RunError(f"--init_adapter {folder} was trained on {base}, not on --model_name {config.model_name}: pass "
                       f"--model_name {base} (the adapter's LoRA weights only fit the base they were trained on)")
    check_same_tokenizer(folder, config)
    return dataclasses.replace(config, **lora_shape(folder, config))


def check_folder(folder: Path, output_dir: Path) -> None:
    """A finished adapter, not in the run's own folder (overwriting or resuming there would replace it)."""
    if not folder.is_dir():
        raise RunError(f"--init_adapter {folder}: no such folder")
    if not (folder / "adapter_model.safetensors").is_file():
        raise RunError(f"--init_adapter {folder} holds no finished adapter (adapter_model.safetensors); pass a "
                       f"finished SFT run's folder or one of its checkpoint-N folders")
    if folder.resolve() == output_dir.resolve() or output_dir.resolve() in folder.resolve().parents:
        raise RunError(f"--init_adapter {folder} is in --output_dir {output_dir}, which this run writes: give the run "
                       f"another --output_dir")


def same_model(a: str, b: str) -> bool:
    """Two model names for one model: the same hub id, a known 4-bit repository and its 16-bit original (the same
    weights, quantized alike on loading), or the same local folder however its path is written."""
    if KNOWN_16BIT.get(a, a) == KNOWN_16BIT.get(b, b):
        return True
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


def check_same_tokenizer(folder: Path, config: Config) -> None:
    """The SFT run's tokenizer file (save_adapter copies it beside the adapter) must be the base's: the pairs are
    rendered with the base's ids, which the adapter was trained on."""
    ours = find_tokenizer_file(config.model_name, config.tokenizer_name)
    theirs = folder / ours.name  # a checkpoint holds only transformers' own tokenizer files: nothing to compare then
    if theirs.is_file() and theirs.read_bytes() != ours.read_bytes():
        raise RunError(f"--init_adapter {folder} was trained with another tokenizer ({theirs.name} differs from "
                       f"{ours}): its token ids would mean other words here; pass the run's --tokenizer_name")


def lora_shape(folder: Path, config: Config) -> dict:
    """The adapter's rank, alpha and target modules, as the run's settings (a note where they differ from them)."""
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    # what the adapter made from the run's LoRA settings would not reproduce: its weights would not fit, or would be
    # scaled otherwise
    odd = {key: saved[key] for key, plain in UNSUPPORTED.items() if saved.get(key) not in plain}
    if odd:
        raise RunError(f"--init_adapter {folder}: its adapter_config.json has " +
                       ", ".join(f"{k}: {v!r}" for k, v in odd.items()) +
                       f", which {TOOLKIT_ADAPTERS}; train the SFT adapter with this toolkit")
    targets = saved["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    shape = {"lora_r": saved["r"], "lora_alpha": saved["lora_alpha"],
             "lora_target_modules": (config.lora_target_modules if set(targets) == set(config.lora_target_modules)
                                     else sorted(targets))}
    differ = {name: value for name, value in shape.items() if value != getattr(config, name)}
    if differ:
        print("note: --init_adapter's adapter has " + ", ".join(f"{k} {v}" for k, v in differ.items()) +
              "; the run trains it as it is")
    return shape
