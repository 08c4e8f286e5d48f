"""The two ways infer.py runs a model, both fed token ids and giving back generated ids up to EOS: transformers
(Unsloth's patched model on a CUDA GPU, with PEFT for an adapter folder) and llama.cpp for a .gguf file (with a LoRA
adapter GGUF). Heavy imports stay inside the functions, so that Unsloth can be imported before transformers.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

from .hub import fetching

# llama.cpp allocates its KV cache for the whole context up front: Mistral's 32k would take 4 GB at 7B.
LLAMA_CPP_CONTEXT = 4096
GPU_BATCH = 8  # prompts per generate call for --input on a GPU


class InferError(RuntimeError):
    """Bad input or a model that cannot be used: one line for the user."""


def adapter_base(path: Path) -> str:
    from .model import adapter_base as recorded_base

    try:
        return recorded_base(path)
    except (KeyError, ValueError) as err:
        raise InferError(f"{path}/adapter_config.json: no usable base_model_name_or_path ({err})") from None


class HFEngine:
    """A transformers model (Unsloth's patched one too); with PEFT, `disable_adapter()` gives the base."""

    def __init__(self, model, eos: int):
        self.model, self.eos = model, eos
        self.vocab_size = model.config.vocab_size
        self.batch_size = GPU_BATCH if model.device.type == "cuda" else 1  # for --input; a CPU gains little

    def base(self):
        return self.model.disable_adapter()

    def generate(self, prompts: list[list[int]], config, on_token=None) -> list[list[int]]:
        """Generated ids of each prompt, up to EOS (not included). `on_token(id) -> stop?` streams a single prompt."""
        import torch

        ids, mask = left_padded(prompts, self.eos, self.model.device)
        stream = _Callback(on_token) if on_token else None
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self._settings(config),
                                      streamer=stream, stopping_criteria=[stream] if stream else None)
        return [_until(row[ids.shape[1]:].tolist(), self.eos) for row in out]

    def _settings(self, config):
        from transformers import GenerationConfig

        sampling = ({"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
                     "top_k": config.top_k} if config.temperature > 0 else {"do_sample": False})
        return GenerationConfig(max_new_tokens=config.max_new_tokens, repetition_penalty=config.repetition_penalty,
                                eos_token_id=self.eos, pad_token_id=self.eos, **sampling)


def left_padded(prompts: list[list[int]], pad: int, device):
    """(ids, attention mask) with the prompts padded on the left, so that every row ends where generation starts."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _until(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


class _Callback:
    """Both streamer and stopping criterion of one generate call (transformers takes either by its methods): hands each
    new id to `on_token` and ends generation once that says so (a marker appeared)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen, self.stop = on_token, False, False

    def put(self, value):
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.stop = self.on_token(int(value.reshape(-1)[0])) or self.stop

    def end(self):
        pass

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)


class LlamaCppEngine:
    """A GGUF file in llama.cpp; prompts go in as ids, one at a time (llama-cpp-python has no batched generate)."""

    def __init__(self, path: Path, seed: int, lora: Path | None = None):
        from llama_cpp import Llama

        try:
            self.llm = Llama(model_path=str(path), n_ctx=LLAMA_CPP_CONTEXT, seed=seed, n_gpu_layers=-1,
                             lora_path=str(lora) if lora else None, verbose=False)
        except ValueError as err:
            what = (f"{path} with the LoRA {lora}: llama.cpp cannot load them" if lora
                    else f"{path}: llama.cpp cannot load this file as a GGUF model")
            raise InferError(f"{what} ({err})") from None
        self.eos, self.vocab_size, self.batch_size = self.llm.token_eos(), self.llm.n_vocab(), 1

    def generate(self, prompts: list[list[int]], config, on_token=None) -> list[list[int]]:
        return [self._one(ids, config, on_token) for ids in prompts]

    def _one(self, ids: list[int], config, on_token) -> list[int]:
        if len(ids) + config.max_new_tokens > self.llm.n_ctx():
            raise InferError(f"{len(ids)} prompt tokens + {config.max_new_tokens} new ones exceed llama.cpp's "
                             f"{self.llm.n_ctx()}-token context")
        out = []
        # min_p and typical_p off: transformers, the other backends, has neither. (llama.cpp's repetition penalty
        # looks back 64 tokens, transformers' over the whole context: the same only at the default 1.0.)
        for token in self.llm.generate(ids, temp=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                       min_p=0.0, typical_p=1.0, repeat_penalty=config.repetition_penalty):
            if token == self.eos:
                break
            out.append(token)
            if (on_token and on_token(token)) or len(out) == config.max_new_tokens:
                break
        return out


def load_engine(path: Path, kind: str, backend: str, eos: int, seed: int, lora: Path | None = None):
    if kind == "gguf":
        print(f"loading {path}{f' + {lora}' if lora else ''} with llama.cpp", file=sys.stderr)
        return LlamaCppEngine(path, seed, lora)
    print(f"loading {path} ({kind}) with {'Unsloth' if backend == 'unsloth' else 'transformers'} on "
          f"{'cpu' if backend == 'cpu' else 'cuda'}", file=sys.stderr)
    if backend == "unsloth":
        from unsloth import FastLanguageModel  # before transformers and peft, which it patches

        # an adapter's base loads in 4 bits as in training (QLoRA); a merged folder as the 16-bit model it is
        with fetching(adapter_base(path), "base model", base_elsewhere(path)) if kind == "adapter" else nullcontext():
            model, _ = FastLanguageModel.from_pretrained(model_name=str(path), load_in_4bit=kind == "adapter",
                                                         dtype=None)
        FastLanguageModel.for_inference(model)
    else:
        model = _load_transformers(path, kind, "cpu" if backend == "cpu" else "cuda")
    if kind == "merged":  # an adapter's weights were checked in its file (model_kind)
        from .model import WeightsError, check_finite

        try:
            check_finite(model.named_parameters(), path)
        except WeightsError as err:
            raise InferError(str(err)) from None
    from transformers import set_seed

    set_seed(seed)
    return HFEngine(model, eos)


def base_elsewhere(adapter: Path) -> str:
    """What to do when an adapter's base cannot be had: infer.py reads the base from the adapter's config."""
    return f"set base_model_name_or_path in {adapter / 'adapter_config.json'} to a local folder with it"


def _load_transformers(path: Path, kind: str, device: str):
    from transformers import AutoModelForCausalLM

    from .device import compute_dtype
    from .model import load_with_adapter

    if kind == "adapter":
        return load_with_adapter(path, base=adapter_base(path), device=device, instead=base_elsewhere(path))
    return AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(), use_safetensors=True).to(device).eval()

