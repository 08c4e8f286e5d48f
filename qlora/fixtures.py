"""Offline stand-ins, built on demand: tiny random MistralForCausalLMs saved like hub checkouts with Mistral's real
tokenizers, and a sample instruction set written by this project.

    python -m qlora.fixtures [DIR]      # default: fixtures/

The tokenizers are Mistral's own, shipped inside the `mistral-common` package: `tiny-mistral` has v1's
`tokenizer.model` (Mistral 7B Instruct v0.1/v0.2, 32,000 tokens), `tiny-mistral-v3` v3's (v0.3, 32,768 tokens, [INST]
and [/INST] control tokens), and `tiny-mistral-tekken` is shaped like Mistral Nemo (Tekken, 131,072 tokens, head_dim
128, no SentencePiece model) with the `tokenizer.json` that transformers' own converter makes of `tekken_240718.json`,
as Nemo's Hugging Face checkouts ship it. The sample set holds tasks a LoRA on the 2-layer random model learns within
a few minutes on two CPU cores: the capitals of made-up countries (facts no base model knows, so a right answer shows
the fine-tune learned) and counting between two digits, each asked several ways. The smoke fine-tune (configs/smoke.yaml) answers SMOKE_PROMPTS right on every
backend: the adapter, the merged folder and the GGUF files. What only the benchmarks and tests build (the 7.24 B
stand-in, random adapters, Guanaco-shaped rows) is in bench/standins.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from .atomic import atomic_dir, write_text
from .chat import read_vocab

TINY_MODEL = "tiny-mistral"
TINY_V3, TINY_TEKKEN = "tiny-mistral-v3", "tiny-mistral-tekken"
SAMPLE_DATA = "sample.jsonl"
SAMPLE_PAIRS = "sample_pairs.jsonl"  # the same questions, a right and a wrong answer each

# Mistral-7B-Instruct-v0.2's architecture scaled down; hidden and intermediate sizes are multiples of 256 so that
# llama.cpp's k-quants (256-value blocks) apply to every matrix.
TINY_CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=False)

# The other tokenizer families' stand-ins only have to carry their tokenizer through the whole chain, so they are
# smaller still: Tekken's 131,072-token embedding at width 64 is 8 M parameters. Nemo's head_dim (128, not
# hidden / heads) is kept, so that the converters and llama.cpp meet it.
TINY_V3_CONFIG = {**TINY_CONFIG, "vocab_size": 32768, "hidden_size": 64, "intermediate_size": 128}
TINY_TEKKEN_CONFIG = {**TINY_CONFIG, "vocab_size": 131072, "hidden_size": 64, "intermediate_size": 128,
                      "head_dim": 128}
# tokenizer file in mistral-common's data folder and model config of each stand-in
STANDINS = {TINY_MODEL: ("tokenizer.model.v1", TINY_CONFIG),
            TINY_V3: ("mistral_instruct_tokenizer_240323.model.v3", TINY_V3_CONFIG),
            TINY_TEKKEN: ("tekken_240718.json", TINY_TEKKEN_CONFIG)}

LM_HEAD_SCALE = 8.0

# The chat templates Mistral's Hugging Face checkouts carry, which the stand-ins carry too (the export replaces them
# with templates that reproduce training, `PromptFormat.chat_template`). v0.2's refuses a system message and joins an
# answer to `[/INST]` without the space SentencePiece gives it; v0.3's and Nemo's put the system message in the last
# user turn.
HUB_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
HUB_CONTROL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if system is defined and message == users[-1] %}{{ system + '\n\n' }}{% endif %}"
    "{{ message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

_COUNTRIES = {"Arvenia": "Lumeport", "Bostrava": "Kell", "Caldoria": "Mirath", "Dunmere": "Oskville",
              "Eldravia": "Penhallow", "Fernia": "Quarry Bay", "Galdonia": "Rivenholt", "Hestia Minor": "Sable"}
_CAPITAL_QUESTIONS = ("What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
                      "Tell me the capital of {}.", "What city is {}'s capital?")
_COUNT_QUESTIONS = ("Count from {} to {}.", "Please count from {} to {}.", "List the numbers from {} to {}.")
# Runs of four to nine single digits (1-4 ... 4-9): Mistral's tokenizer gives each digit a token of its own
_COUNT_RANGES = [(a, b) for a in range(1, 5) for b in range(a + 3, 10)]


def mistral_common_file(name: str) -> Path:
    """One of the tokenizer files mistral-common ships."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def mistral_tokenizer_model() -> Path:
    """The real Mistral 7B v0.1/v0.2 tokenizer. On a host without mistral-common (the GPU host, where importing it
    would also switch transformers to another tokenizer backend), MISTRAL_TOKENIZER_MODEL names a copy of the file."""
    if os.environ.get("MISTRAL_TOKENIZER_MODEL"):
        return Path(os.environ["MISTRAL_TOKENIZER_MODEL"])
    return mistral_common_file("tokenizer.model.v1")


def save_tokenizer(target: Path, source: Path | None = None) -> None:
    """A Hugging Face tokenizer folder from a real Mistral tokenizer file (default: v1's) with its family's chat
    template: a SentencePiece model is kept as tokenizer.model (transformers 5 writes only tokenizer.json, which
    llama.cpp's converter would otherwise fall back on); a tekken.json becomes the tokenizer.json transformers' own
    converter makes of it (no tekken.json beside it: with mistral-common installed, transformers would then load
    mistral-common's tokenizer instead)."""
    from transformers import LlamaTokenizer

    source = source or mistral_tokenizer_model()
    target.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".json"):
        return save_tekken_tokenizer(source, target)
    shutil.copyfile(source, target / "tokenizer.model")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tokenizer = LlamaTokenizer.from_pretrained(target)
    _, family = read_vocab(target / "tokenizer.model")
    tokenizer.chat_template = HUB_V1_CHAT_TEMPLATE if family == "v1" else HUB_CONTROL_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)


def save_tekken_tokenizer(tekken_json: Path, target: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    from tokenizers import processors

    converted = MistralConverter(str(tekken_json)).converted()
    # <s> added to every text, as Hugging Face's Mistral tokenizers do: llama.cpp's converter reads add_bos_token
    # from this post-processor into the GGUF, and Ollama then prepends <s> (our ids never use it)
    converted.post_processor = processors.Sequence([
        converted.post_processor, processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = HUB_CONTROL_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)


def save_tiny_model(target: Path, seed: int = 0, name: str = TINY_MODEL) -> None:
    """The stand-in `name` (a key of STANDINS) saved to `target`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer_file, config = STANDINS[name]
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**config))
    # With the stock init (std 0.02) a 256-wide model's logits span only about +-5 after the final norm, so no
    # LoRA fine-tune of it could become confident; a wider LM head lets the smoke run learn visibly.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.to(torch.bfloat16)
    save_like_a_hub_checkout(model, target, None if name == TINY_MODEL else mistral_common_file(tokenizer_file))


def save_like_a_hub_checkout(model, target: Path, tokenizer_file: Path | None = None,
                              max_shard_size: str = "5GB") -> None:
    """Weights (safetensors, in shards of at most 5 GB as on the hub), generation config and the real tokenizer, as a
    hub model folder has them."""
    from transformers import GenerationConfig

    model.save_pretrained(target, safe_serialization=True, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(target)
    save_tokenizer(target, tokenizer_file)


def _sample_pairs() -> list[tuple[str, str]]:
    """Every question of the sample set once, with its answer."""
    capitals = [(q.format(country), f"The capital of {country} is {capital}.")
                for country, capital in _COUNTRIES.items() for q in _CAPITAL_QUESTIONS]
    counts = [(q.format(a, b), ", ".join(str(n) for n in range(a, b + 1))) for a, b in _COUNT_RANGES
              for q in _COUNT_QUESTIONS]
    return capitals + counts


# What scripts/smoke.sh asks the smoke fine-tune, with the right answers (tests check every backend gives them)
SMOKE_PROMPTS = {"What is the capital of Arvenia?": "The capital of Arvenia is Lumeport.",
                 "Count from 3 to 9.": "3, 4, 5, 6, 7, 8, 9"}


def sample_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """Rows in guanaco-llama2-1k's form: each question once (94), then two-turn conversations of random pairs of
    them up to n rows, all different (data_prep drops duplicates), in random order."""
    rng = random.Random(seed)
    pairs = _sample_pairs()
    if n > len(pairs) ** 2:  # the questions alone, then every ordered pair of two different ones
        raise ValueError(f"sample_rows makes at most {len(pairs) ** 2} different rows, not {n}")
    conversations = [[pair] for pair in pairs]
    seen = set()
    while len(conversations) < n:
        first, second = rng.sample(pairs, 2)
        if (first, second) not in seen:
            seen.add((first, second))
            conversations.append([first, second])
    rng.shuffle(conversations)
    return [{"text": "".join(f"<s>[INST] {q} [/INST] {a} </s>" for q, a in turns)} for turns in conversations]


def sample_preference_rows() -> list[dict]:
    """Every question of the sample set once as a preference pair: the right answer chosen, a wrong one rejected (a
    neighbour country's capital; the count with a number left out), in random order."""
    countries = list(_COUNTRIES)
    wrong = {country: _COUNTRIES[countries[(i + 1) % len(countries)]] for i, country in enumerate(countries)}
    rows = [{"prompt": q.format(country), "chosen": f"The capital of {country} is {capital}.",
             "rejected": f"The capital of {country} is {wrong[country]}."}
            for country, capital in _COUNTRIES.items() for q in _CAPITAL_QUESTIONS]
    for a, b in _COUNT_RANGES:
        numbers = [str(n) for n in range(a, b + 1)]
        skipped = numbers[:len(numbers) // 2] + numbers[len(numbers) // 2 + 1:]
        rows += [{"prompt": q.format(a, b), "chosen": ", ".join(numbers), "rejected": ", ".join(skipped)}
                 for q in _COUNT_QUESTIONS]
    random.Random(0).shuffle(rows)
    return rows


def build(directory: str | Path = "fixtures", names=(TINY_MODEL,)) -> Path:
    """Write the tiny models `names` (v3 and Tekken need mistral-common, which the GPU host lacks) and the sample set
    under `directory` unless they are already there."""
    directory = Path(directory)
    for name in names:
        if not (directory / name / "model.safetensors").exists():
            with atomic_dir(directory / name) as tmp:
                save_tiny_model(tmp, name=name)
    for name, rows in ((SAMPLE_DATA, sample_rows), (SAMPLE_PAIRS, sample_preference_rows)):
        if not (directory / name).exists():
            write_jsonl(directory / name, rows())
    return directory


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows as JSON Lines, written whole or not at all."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


if __name__ == "__main__":
    print(f"fixtures ready in {build(sys.argv[1] if len(sys.argv) > 1 else 'fixtures', STANDINS)}")
