"""Stand-ins that only the benchmarks and the tests build: the 7.24 B stand-in for Mistral-7B-Instruct-v0.2 (random
bf16 weights, its exact architecture, the real tokenizer), a random LoRA adapter for any base, rows shaped like
OpenAssistant-Guanaco's, and preference pairs of about 1,000 tokens. The smoke run's stand-ins, which the product's
setup builds, are qlora/fixtures.py's.

Benchmarks import it as `standins` (their folder is on sys.path), tests as `bench.standins` (the repository root is).
"""

from __future__ import annotations

import random
from pathlib import Path

from qlora.fixtures import save_like_a_hub_checkout

# Mistral-7B-Instruct-v0.2's exact architecture: speed and memory of QLoRA do not depend on the weight values, so a
# randomly initialised model with this config stands in for the real one on machines that cannot reach the hub.
MISTRAL_7B_V02_CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                             rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)

_WORDS = ("apple river stone cloud maple tiger ocean lamp violet paper garden silver rocket candle harbor "
          "meadow pencil falcon copper window basket summer winter autumn spring bridge castle forest desert").split()
# Mistral's tokenizer gives the sentences made of these words 1.38 tokens a word (periods and capitals included)
_TOKENS_PER_WORD = 1.38


def save_standin(target: Path, num_layers: int = 32, device: str = "cuda", config: dict | None = None,
                 max_shard_size: str = "5GB") -> Path:
    """The 7.24 B stand-in for Mistral-7B-Instruct-v0.2 (random bf16 weights, real tokenizer), built on `device`
    directly in bf16 (14.5 GB) and saved like a hub checkout. `num_layers` below 32 makes a quick small check;
    `config` changes other settings of the architecture."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise the 29 GB float32 copy
    try:
        with torch.device(device):
            model = MistralForCausalLM(MistralConfig(**MISTRAL_7B_V02_CONFIG | {"num_hidden_layers": num_layers}
                                                     | (config or {})))
    finally:
        torch.set_default_dtype(previous)
    save_like_a_hub_checkout(model, target, max_shard_size=max_shard_size)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the 14.5 GB back: the benchmarks train in other processes on this GPU
    return Path(target)


def save_random_adapter(base: Path, target: Path, r: int = 8, alpha: int = 16) -> Path:
    """A random LoRA (r 8 on all 7 projections, B and A both random) for the model in `base`, made by PEFT on the
    model without its weights (meta device): only the LoRA matrices get memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.config import LORA_TARGETS

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    model.name_or_path = str(base)  # what PEFT records as the adapter's base
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS,
                                                  task_type="CAUSAL_LM"))
    for name, module in peft_model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):  # only these get memory and values
            module.to_empty(device="cpu")
            torch.nn.init.normal_(module.weight, std=0.02)
    peft_model.save_pretrained(target)
    return Path(target)


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


def _prose(rng: random.Random, tokens: float) -> str:
    """Sentences of 6 to 16 words, about `tokens` tokens for Mistral's tokenizer in all."""
    words, sentences = max(1, round(tokens / _TOKENS_PER_WORD)), []
    while words > 0:
        count = min(words, rng.randint(6, 16))
        sentences.append(" ".join(rng.choices(_WORDS, k=count)).capitalize() + ".")
        words -= count
    return " ".join(sentences)


def preference_shaped_rows(n: int = 2000, seed: int = 1, tokens: int = 1000) -> list[dict]:
    """Preference pairs ({prompt, chosen, rejected}) whose prompt and longer answer make about `tokens` tokens (for
    1,000: a prompt of 100 to 400 tokens, the longer answer 600 to 900, the other 40 to 95% of it, the chosen one the
    longer in 7 pairs of 10, as in UltraFeedback, where the preferred answer tends to be the longer one). Chosen and
    rejected are different texts. Plain text, no template: each trainer applies its own."""
    rng = random.Random(seed)
    scale = tokens / 1000
    rows = []
    for _ in range(n):
        prompt = _prose(rng, rng.uniform(100, 400) * scale)
        longer = rng.uniform(600, 900) * scale
        answers = [_prose(rng, longer), _prose(rng, longer * rng.uniform(0.4, 0.95))]
        chosen, rejected = answers if rng.random() < 0.7 else answers[::-1]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
