"""A LoRA adapter merged into its 16-bit base tensor by tensor, in bounded memory: the whole model is never held.

Each weight of the base is read alone from its safetensors shard (`safe_open`, memory-mapped, closed again at once),
the adapter's update scale * B @ A is added in float32 to the LoRA targets, and the result is rounded to float16 and
appended to the output shard, whose header was written first from the base's headers (shapes and dtypes), with the
index json and config.json beside them. So the merge holds one tensor, in float32, whatever the model's size:
safetensors' own `save_file` takes a whole shard in memory, and the format is only a JSON header and the raw bytes.
float16 rather than Mistral's bfloat16: the LoRA update survives the rounding 8x better, and the f16 GGUF is then a
lossless copy of the merged weights.

PEFT names the adapter's tensors after the model wrapped in its LoRA model: `base_model.model.` + the base's module
name + `.lora_A.weight` / `.lora_B.weight`; modules trained in full (`modules_to_save`) are saved whole under the
base's own tensor name.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from . import atomic

SHARD_BYTES = 5 * 10**9  # output shards of at most 5 GB, as the hub's checkouts (never held: written as they come)
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
FLOAT16_MAX = 65504.0
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors dtypes merged as float16; others are copied as they are
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class MergeError(RuntimeError):
    """A merge that cannot go on: the message names the file or tensor and what to do."""


@dataclass
class Lora:
    a: str  # the adapter's tensor names
    b: str
    scale: float


def merge_into(adapter_dir: Path, base_dir: Path, target: Path) -> None:
    """The merged model in float16 safetensors shards (with an index json where there are several) and its config, into
    `target` (a fresh folder, written in place: the caller makes it atomic). Tokenizer files are the caller's."""
    from safetensors import safe_open

    settings = adapter_settings(adapter_dir)
    adapter_file = adapter_dir / "adapter_model.safetensors"
    base_files = weight_files(base_dir)
    with safe_open(adapter_file, "pt") as adapter:
        loras, replaced = lora_updates(list(adapter.keys()), settings, adapter_file, adapter)
    names = {name: file for file in base_files for name in tensor_names(file)}
    unknown = sorted(set(loras) - set(names) | set(replaced) - set(names))
    if unknown:
        raise MergeError(f"{adapter_file}: the adapter changes {unknown[0]}, which {base_dir} does not have "
                         f"({len(unknown)} such tensor(s)); is it the base the adapter was trained on?")
    check_shapes(adapter_file, base_dir, loras, replaced, names)
    shards = output_shards(names)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        shard_name = SINGLE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_shard(target / shard_name, shard, lambda name: merge_tensor(
            name, names[name], loras.get(name), replaced.get(name), adapter_file))
        weight_map |= {entry.name: shard_name for entry in shard}
    total = sum(entry.nbytes for shard in shards for entry in shard)
    if len(shards) > 1:  # one shard is model.safetensors alone, as save_pretrained writes it
        (target / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                                    + "\n", encoding="utf-8")
    write_config(base_dir, target)


def check_shapes(adapter_file: Path, base_dir: Path, loras: dict, replaced: dict, names: dict) -> None:
    """Before anything is merged, every tensor the adapter changes has the base's shape: B @ A is (out, in) as the
    base weight, a tensor trained in full is the base's shape (a base of another size or vocabulary is not)."""
    from safetensors import safe_open

    with safe_open(adapter_file, "pt") as adapter:
        wanted = {name: [adapter.get_slice(lora.b).get_shape()[0], adapter.get_slice(lora.a).get_shape()[1]]
                  for name, lora in loras.items()}
        wanted |= {name: list(adapter.get_slice(key).get_shape()) for name, key in replaced.items()}
    for file in dict.fromkeys(names[name] for name in wanted):
        with safe_open(file, "pt") as base:
            for name in (n for n in wanted if names[n] == file):
                has = list(base.get_slice(name).get_shape())
                if has != wanted[name]:
                    raise MergeError(f"{adapter_file}: the adapter's {name} is {wanted[name]} but {base_dir} has "
                                     f"{has}: another model than the one it was trained on; pass --base_model_16bit "
                                     f"with the 16-bit checkout of its base")


def adapter_settings(adapter_dir: Path) -> dict:
    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("use_dora"):
        raise MergeError(f"{adapter_dir}/adapter_config.json: use_dora is set, and DoRA's magnitude vectors are not "
                         f"merged by this export; merge it with PEFT's merge_and_unload and pass the merged folder "
                         f"as --base_model_16bit of a zero adapter, or train without DoRA")
    if settings.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}/adapter_config.json: peft_type {settings['peft_type']} is not LoRA")
    return settings


def lora_scale(settings: dict, module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA, with PEFT's per-module alpha_pattern (rank_pattern needs no lookup:
    the rank is the lora_A's row count)."""
    from peft.utils.other import get_pattern_key

    alphas = settings.get("alpha_pattern") or {}
    alpha = alphas.get(get_pattern_key(list(alphas), module), settings["lora_alpha"])
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def lora_updates(keys: list[str], settings: dict, adapter_file: Path, adapter) -> tuple[dict, dict]:
    """({base tensor: its Lora}, {base tensor: the adapter's tensor replacing it whole}) from the adapter's names."""
    loras, replaced, pairs = {}, {}, {}
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = key
        elif "lora_" in name or "magnitude" in name:
            raise MergeError(f"{adapter_file}: {key} is a LoRA tensor of a kind this merge does not know (LoRA on "
                             f"an embedding, or DoRA); merge it with PEFT's merge_and_unload instead")
        else:
            replaced[name] = key  # modules_to_save: trained in full
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise MergeError(f"{adapter_file}: {module} has lora_{''.join(pair)} but not its pair; save the adapter "
                             f"again")
        rank = adapter.get_slice(pair["A"]).get_shape()[0]
        loras[f"{module}.weight"] = Lora(pair["A"], pair["B"], lora_scale(settings, module, rank))
    if settings.get("fan_in_fan_out"):
        raise MergeError(f"{adapter_file}: fan_in_fan_out (GPT-2's Conv1D layers) is not a Mistral adapter")
    return loras, replaced


def weight_files(base_dir: Path) -> list[Path]:
    """The base's safetensors files, in its index's order (or its single file). Pickled .bin weights are never read."""
    index = base_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [base_dir / f for f in dict.fromkeys(weight_map.values())]
    single = base_dir / SINGLE
    if single.is_file():
        return [single]
    raise MergeError(f"{base_dir}: no model.safetensors or {INDEX} (pickled .bin weights are not read); "
                     f"pass --base_model_16bit with a safetensors checkout of the base")


def tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return list(f.keys())


@dataclass
class Entry:
    """One tensor of an output shard, as its header says it: name, safetensors dtype, shape, size in bytes."""
    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


def output_shards(names: dict[str, Path]) -> list[list[Entry]]:
    """The base's tensors in order, as they will be written (floats as float16), cut into output shards of at most
    SHARD_BYTES: from the base's headers alone."""
    from safetensors import safe_open

    shards, size = [[]], 0
    for file in dict.fromkeys(names.values()):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                info = f.get_slice(name)
                dtype = "F16" if info.get_dtype() in FLOATS else info.get_dtype()
                entry = Entry(name, dtype, list(info.get_shape()))
                if shards[-1] and size + entry.nbytes > SHARD_BYTES:
                    shards.append([])
                    size = 0
                shards[-1].append(entry)
                size += entry.nbytes
    return shards


def merge_tensor(name: str, base_file: Path, lora: Lora | None, replacement: str | None, adapter_file: Path):
    """One tensor of the merged model: the base's, updated in float32 and rounded to float16 (other dtypes as they
    are). Refuses a value float16 cannot hold: a bfloat16 base can hold values above 65504, which would become inf."""
    import torch
    from safetensors import safe_open

    with safe_open(adapter_file if replacement else base_file, "pt") as f:
        tensor = f.get_tensor(replacement or name)
    if not tensor.is_floating_point():
        return tensor
    weight = tensor.float()
    del tensor
    if lora is not None:
        with safe_open(adapter_file, "pt") as f:
            a, b = f.get_tensor(lora.a).float(), f.get_tensor(lora.b).float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise MergeError(f"{adapter_file}: the adapter's {lora.a.removesuffix('.lora_A.weight')} holds NaN or "
                             f"inf; train again or export an earlier checkpoint")
        weight.addmm_(b, a, alpha=lora.scale)
    if not torch.isfinite(weight).all():
        raise MergeError(f"{base_file}: {name} holds NaN or inf after the merge; check the base and the adapter")
    peak = weight.abs().max().item() if weight.numel() else 0.0
    if peak > FLOAT16_MAX:
        raise MergeError(f"{base_file}: {name} holds {peak:.4g}, beyond float16's {FLOAT16_MAX:g} (the merged model "
                         f"is float16 like the f16 GGUF); this base cannot be exported to f16")
    return weight.to(torch.float16)


def write_shard(target: Path, entries: list[Entry], tensor_of) -> None:
    """A safetensors file written tensor by tensor: the header (8-byte length, JSON padded to 8 bytes, offsets in
    order), then each tensor's bytes as `tensor_of(name)` makes it. A failed write (a full disk) is one line."""
    import torch

    header, offset = {}, 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": entry.shape,
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for entry in entries:
                tensor = tensor_of(entry.name)
                if list(tensor.shape) != entry.shape or tensor.element_size() != DTYPE_BYTES[entry.dtype]:
                    raise MergeError(f"{target}: {entry.name} came out as {tensor.dtype} {list(tensor.shape)}, "
                                     f"not {entry.dtype} {entry.shape}")
                out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
    except OSError as err:
        raise MergeError(f"{target}: cannot write the merged model ({err.strerror or err}); free some space "
                         f"(df -h {target.parent}) and run again") from None


def write_config(base_dir: Path, target: Path) -> None:
    """The base's config.json as float16 without a quantization config, and its generation config."""
    settings = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    settings.pop("quantization_config", None)
    settings["dtype"] = "float16"
    if "torch_dtype" in settings:
        settings["torch_dtype"] = "float16"
    (target / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, target / "generation_config.json")


def base_checkout(base: str, what: str) -> Path:
    """The 16-bit base as a folder: its own, else its hub snapshot (safetensors weights, configs and tokenizer.model),
    downloaded once into the Hugging Face cache. `what` names it in the error."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    from .hub import LOCAL_BASE, fetching

    with fetching(base, what, LOCAL_BASE):  # offline, gated, no such repository: one line
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))


def dequantized_checkout(base: str, target: Path) -> Path:
    """A 4-bit base without a known 16-bit original, dequantized on the GPU (bitsandbytes' 4-bit weights) and saved as
    float16 safetensors shards: the merge then streams from that folder as from any 16-bit base."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hub import LOCAL_BASE, fetching

    if not torch.cuda.is_available():
        raise MergeError(f"{base}: dequantizing a 4-bit model needs a CUDA GPU; on this machine pass "
                         f"--base_model_16bit with its 16-bit original")
    with fetching(base, "base model", LOCAL_BASE):
        quantized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, device_map={"": 0},
                                                         use_safetensors=True)
    model = quantized.dequantize()  # on the GPU: only the shard being written comes to the CPU
    model.config.quantization_config = None
    with atomic.atomic_dir(target) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_BYTES)
    del model, quantized
    torch.cuda.empty_cache()
    return target
