"""Loading the base model with LoRA adapters: Unsloth (CUDA, default), transformers + bitsandbytes + PEFT (CUDA), or
plain transformers + PEFT on the CPU. Heavy imports stay inside the functions: Unsloth must be imported before
transformers, trl and peft, and the scripts decide the backend before anything imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .device import compute_dtype, local_device_index
from .hub import LOCAL_BASE, LOCAL_MODEL, fetching


class WeightsError(ValueError):
    """Weights that cannot be used (a damaged file, NaN or inf): one line naming the file and what to do."""


def _lora_config(config):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")


def _load_unsloth(config):
    import torch
    from unsloth import FastLanguageModel

    # Unsloth (without xformers or FlashAttention 2) attends through PyTorch's SDPA with a padding mask, which on
    # Hopper picks cuDNN attention: about 2.6 ms of CPU a call to set up, so the GPU waits for the host. PyTorch's
    # memory-efficient kernel instead: 1.16x real tokens/s with 15 GiB free, a step 0.68 -> 0.55 s on a whole H200
    # (bench/RESULTS.md).
    torch.backends.cuda.enable_cudnn_sdp(False)

    with fetching(config.model_name, "model", LOCAL_MODEL):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=config.model_name, max_seq_length=config.max_seq_length, load_in_4bit=config.load_in_4bit,
            dtype=None, device_map={"": local_device_index()})
    check_target_modules(model, config.lora_target_modules, config.model_name)
    model = FastLanguageModel.get_peft_model(
        model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules), bias="none",
        use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[config.gradient_checkpointing],
        random_state=config.seed, max_seq_length=config.max_seq_length,
        # with recompute, these decoder layers keep their activations (the planner fits as many as memory allows)
        checkpoint_skip_layers=config.checkpoint_skip_layers if config.gradient_checkpointing == "true" else 0)
    return model, tokenizer


def nf4_config(dtype):
    """QLoRA's 4-bit NormalFloat with double quantization, computing in `dtype` (what Unsloth's 4-bit loading uses)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _load_hf(config, quantize: bool):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype()
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if quantize:
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": local_device_index()}
    with fetching(config.model_name, "model", LOCAL_MODEL):
        model = AutoModelForCausalLM.from_pretrained(config.model_name, **kwargs)
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing != "false")
    elif torch.cuda.is_available():
        model.to(f"cuda:{local_device_index()}")
    check_target_modules(model, config.lora_target_modules, config.model_name)
    return get_peft_model(model, _lora_config(config))


def load_for_training(config, backend: str):
    """(peft model, Hugging Face tokenizer) for the chosen backend."""
    from transformers import AutoTokenizer

    if backend == "unsloth":
        model, tokenizer = _load_unsloth(config)
    else:
        with fetching(config.tokenizer_name or config.model_name, "tokenizer" if config.tokenizer_name else "model",
                      "pass --tokenizer_name PATH to a local folder with it" if config.tokenizer_name else LOCAL_MODEL):
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name or config.model_name)
        model = _load_hf(config, quantize=backend == "hf" and config.load_in_4bit)
    if config.init_adapter:
        load_adapter_weights(model, config.init_adapter)
    # Training never reads a KV cache, and with one transformers ignores the boundaries of packed rows
    model.config.use_cache = False
    return model, tokenizer


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """An SFT run's LoRA weights into the new adapter of the same shape (qlora/init_adapter.py checked them): the same
    way on every backend, Unsloth's fast LoRA layers included."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(Path(adapter_dir) / "adapter_model.safetensors"))
    missing = [key for key in loaded.missing_keys if "lora_" in key]
    if loaded.unexpected_keys or missing:
        raise WeightsError(f"{adapter_dir}: its LoRA weights do not fit the adapter made from its adapter_config.json "
                           f"({len(missing)} missing, {len(loaded.unexpected_keys)} unexpected); train it again")


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as PEFT recorded it."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter folder)")
    return json.loads(config_file.read_text())["base_model_name_or_path"]


def check_safetensors_adapter(adapter_dir: str | Path) -> None:
    """Adapters are read from safetensors only: a pickled adapter_model.bin could run code when loaded. The file must
    be whole (a copy cut short) and its weights finite (a run that diverged), before anything is loaded on it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (pickled .bin adapters are not loaded; "
                                f"save it again with save_pretrained(..., safe_serialization=True))")
    try:
        weights = load_file(path)
    except SafetensorError as err:
        raise WeightsError(f"{path}: not a whole safetensors file ({err}); copy or save it again") from None
    check_finite(weights.items(), path)


def check_finite(named_tensors, source) -> None:
    """NaN or inf in a weight: a model that would answer "⁇ ⁇ ⁇", refused (PEFT's safe merge refuses it too)."""
    import torch

    bad = next((name for name, tensor in named_tensors if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise WeightsError(f"{source}: weight {bad} holds NaN or inf (the training diverged); use an earlier "
                           f"checkpoint, or train again with a lower --learning_rate")


def check_target_modules(model, targets: list[str], model_name: str) -> None:
    """--lora_target_modules against the loaded model, matched as PEFT matches them (a name or a dotted suffix of
    one), before PEFT's own refusal, a traceback; lists the linear modules the model has."""
    import torch

    from .config import ConfigError

    if targets == ["all-linear"]:  # PEFT's word for every linear layer
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora_target_modules: {model_name} has no module {', '.join(missing)}; its linear "
                          f"modules are {', '.join(linear)}")


def load_with_adapter(adapter_dir: str | Path, base: str | None = None, dtype=None, device: str = "cpu",
                      instead: str = LOCAL_BASE):
    """Base model in 16/32 bits (never 4-bit) with the adapter attached, in eval mode; for merging and inference.
    `instead` says what to do when the base cannot be had."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_safetensors_adapter(adapter_dir)
    base = base or adapter_base(adapter_dir)
    with fetching(base, "base model", instead):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or compute_dtype(), use_safetensors=True)
    model = model.to(device)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
