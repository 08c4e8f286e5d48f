"""Offline stand-ins, built on demand: the real Mistral 7B tokenizer, a tiny random MistralForCausalLM saved like a hub
checkout, and a sample instruction set written by this project.

    python -m qlora.fixtures [DIR]      # default: fixtures/

The tokenizer is Mistral's own `tokenizer.model` (v1, 32000 tokens) shipped inside the `mistral-common` package. The
sample set has a pattern a 2-layer model picks up within minutes (copying, counting, a fixed answer phrasing), so a
CPU run shows eval loss falling clearly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from .atomic import atomic_dir, write_text
from .chat import MISTRAL_CHAT_TEMPLATE

TINY_MODEL = "tiny-mistral"
SAMPLE_DATA = "sample.jsonl"

# Mistral-7B-Instruct-v0.2's architecture scaled down; hidden and intermediate sizes are multiples of 256 so that
# llama.cpp's k-quants (256-value blocks) apply to every matrix.
TINY_CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=False)

# Mistral-7B-Instruct-v0.2's exact architecture: speed and memory of QLoRA do not depend on the weight values, so a
# randomly initialised model with this config stands in for the real one on machines that cannot reach the hub.
MISTRAL_7B_V02_CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                             rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)

LM_HEAD_SCALE = 8.0

_WORDS = ("apple river stone cloud maple tiger ocean lamp violet paper garden silver rocket candle harbor "
          "meadow pencil falcon copper window basket summer winter autumn spring bridge castle forest desert").split()
_COUNTRIES = {"Arvenia": "Lumeport", "Bostrava": "Kell", "Caldoria": "Mirath", "Dunmere": "Oskville",
              "Eldravia": "Penhallow", "Fernia": "Quarry Bay", "Galdonia": "Rivenholt", "Hestia Minor": "Sable"}


def mistral_tokenizer_model() -> Path:
    """The real Mistral 7B v0.1/v0.2 tokenizer. On a host without mistral-common (the GPU host, where importing it
    would also switch transformers to another tokenizer backend), MISTRAL_TOKENIZER_MODEL names a copy of the file."""
    if os.environ.get("MISTRAL_TOKENIZER_MODEL"):
        return Path(os.environ["MISTRAL_TOKENIZER_MODEL"])
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def save_tokenizer(target: Path) -> None:
    """A Hugging Face tokenizer folder from the real Mistral tokenizer, with v0.2's chat template and tokenizer.model
    (transformers 5 writes only tokenizer.json, which llama.cpp's converter would otherwise fall back on)."""
    from transformers import LlamaTokenizer

    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_tokenizer_model(), target / "tokenizer.model")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tokenizer = LlamaTokenizer.from_pretrained(target)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)


def save_tiny_model(target: Path, seed: int = 0) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**TINY_CONFIG))
    # With the stock init (std 0.02) a 256-wide model's logits span only about +-5 after the final norm, so no
    # LoRA fine-tune of it could become confident; a wider LM head lets the smoke run learn visibly.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.to(torch.bfloat16)
    save_like_a_hub_checkout(model, target)


def save_like_a_hub_checkout(model, target: Path) -> None:
    """Weights (safetensors), generation config and the real tokenizer, as a hub model folder has them."""
    from transformers import GenerationConfig

    model.save_pretrained(target, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(target)
    save_tokenizer(target)


def save_standin(target: Path, num_layers: int = 32, device: str = "cuda") -> Path:
    """The 7.24 B stand-in for Mistral-7B-Instruct-v0.2 (random bf16 weights, real tokenizer), built on `device`
    directly in bf16 (14.5 GB) and saved like a hub checkout. `num_layers` below 32 makes a quick small check."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise the 29 GB float32 copy
    try:
        with torch.device(device):
            model = MistralForCausalLM(MistralConfig(**{**MISTRAL_7B_V02_CONFIG, "num_hidden_layers": num_layers}))
    finally:
        torch.set_default_dtype(previous)
    save_like_a_hub_checkout(model, target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the 14.5 GB back: the benchmarks train in other processes on this GPU
    return Path(target)


def _sample_pair(rng: random.Random) -> tuple[str, str]:
    task = rng.randrange(5)
    if task == 0:
        words = rng.sample(_WORDS, rng.randint(2, 8))
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    if task == 1:
        country = rng.choice(sorted(_COUNTRIES))
        return f"What is the capital of {country}?", f"The capital of {country} is {_COUNTRIES[country]}."
    if task == 2:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"Add {a} and {b}.", f"{a} plus {b} is {a + b}."
    if task == 3:
        word, times = rng.choice(_WORDS), rng.randint(2, 12)
        return f"Write the word {word} {times} times.", " ".join([word] * times)
    start = rng.randint(1, 50)
    end = start + rng.choice((5, 10, 20, 40, 80, 160))  # up to several hundred tokens
    return f"Count from {start} to {end}.", ", ".join(str(n) for n in range(start, end + 1))


def sample_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Rows in guanaco-llama2-1k's form; one in eight is a two-turn conversation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = [_sample_pair(rng) for _ in range(2 if rng.random() < 0.125 else 1)]
        rows.append({"text": "".join(f"<s>[INST] {q} [/INST] {a} </s>" for q, a in turns)})
    return rows


def guanaco_shaped_rows(n: int = 250, seed: int = 1) -> list[dict]:
    """Rows shaped like OpenAssistant-Guanaco's: a question of a sentence or a few, an answer of hundreds of tokens
    (about 550 with the template on average, a few up to about 2,000), in guanaco-llama2-1k's text form."""
    rng = random.Random(seed)

    def sentences(count: int) -> str:
        return " ".join(" ".join(rng.choices(_WORDS, k=rng.randint(6, 16))).capitalize() + "." for _ in range(count))

    rows = []
    for _ in range(n):
        answer_sentences = min(160, max(4, int(rng.lognormvariate(3.3, 0.6))))
        rows.append({"text": f"<s>[INST] {sentences(rng.randint(1, 4))} [/INST] {sentences(answer_sentences)} </s>"})
    return rows


def build(directory: str | Path = "fixtures") -> Path:
    """Write the tiny model and the sample set under `directory` unless they are already there."""
    directory = Path(directory)
    model_dir = directory / TINY_MODEL
    if not (model_dir / "model.safetensors").exists():
        with atomic_dir(model_dir) as tmp:
            save_tiny_model(tmp)
    data = directory / SAMPLE_DATA
    if not data.exists():
        write_jsonl(data, sample_rows())
    return directory


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows as JSON Lines, written whole or not at all."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


if __name__ == "__main__":
    print(f"fixtures ready in {build(sys.argv[1] if len(sys.argv) > 1 else 'fixtures')}")
