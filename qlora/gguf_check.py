"""Checks of a GGUF file against the merged Hugging Face model it came from, in llama.cpp.

The reference is the merged model in float32, decoding greedily from Mistral's own ids for each check prompt. llama.cpp
decodes from the same ids (not its own tokenization, which is checked separately: it must give the same ids from the
text Ollama hands it). An f16 file must give the same greedy tokens up to the first near-tie and logits with cosine at
least MIN_COSINE; quantized files are reported. llama.cpp runs in a child process (`isolate.run_isolated`), so a crash
there (SIGILL where llama-cpp-python was built for another CPU) becomes an entry in the report, not the export's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import isolate
from .chat import Conversation, Message, PromptFormat

NEAR_TIE = 1e-2  # HF top-2 logit margin under which f16 rounding may legitimately flip the greedy choice
MIN_COSINE = 0.9999  # f16 next-token logits must match the float32 reference at least this well
GREEDY_STEPS = 32

# Prompts the finished files are checked on: single-turn, with a system message, and multi-turn.
CHECK_PROMPTS = [
    [Message("user", "What is the capital of France?")],
    [Message("system", "You are a concise assistant."), Message("user", "Write a haiku about autumn leaves.")],
    [Message("user", "Add 12 and 30."), Message("assistant", "12 plus 30 is 42."),
     Message("user", "Now subtract 5 from that.")],
]


def rendered_text(prompt_format: PromptFormat, conversation: Conversation) -> str:
    """The training ids as text, control tokens (`<s>`, `</s>`, v3's and Tekken's `[INST]`) spelled out and the text
    between them decoded."""
    return prompt_format.text(prompt_format.encode(conversation)[0])


def ollama_text(prompt_format: PromptFormat, conversation: Conversation) -> str:
    """The rendered prompt as Ollama hands it to llama.cpp: the text, BOS left for llama.cpp to add."""
    return rendered_text(prompt_format, conversation).removeprefix(prompt_format.vocab.piece(prompt_format.bos))


def llama_cpp_tokenize(llm, text: str) -> list[int]:
    """llama.cpp's own tokenization of a rendered text, as Ollama does it: BOS added, special tokens parsed."""
    return llm.tokenize(text.encode(), add_bos=True, special=True)


@dataclass
class Run:
    tokens: list[int]
    first_logits: object  # numpy array: the next-token logits after the prompt
    margins: list[float]  # HF only: top-2 logit margin at each greedy step


@dataclass
class Reference:
    """What every file is checked against: the merged model's greedy runs from the prompts' ids, and the prompts as
    the text Ollama hands to llama.cpp (whose tokenization must give the same ids)."""
    runs: list[Run]
    ids: list[list[int]]
    texts: list[str]


def load_reference(merged_dir: Path):
    """The merged HF model in float32 (on the GPU when it fits there): the reference every file is checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True)
    return model.to(reference_device(model)).eval()


def reference_device(model) -> str:
    """The GPU when `model` in float32 fits in its free memory with a fifth to spare, else the CPU: a 7 B reference
    takes 29 GB, more than a 16 or 24 GB card has."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if 1.2 * 4 * model.num_parameters() < torch.cuda.mem_get_info()[0] else "cpu"


def reference(model, prompt_format: PromptFormat, prompts: list[Conversation], steps: int = GREEDY_STEPS) -> Reference:
    """Greedy decoding of the reference model from each prompt's ids, with the top-2 logit margin at every step."""
    import torch

    ids = [prompt_format.prompt_ids(c) for c in prompts]
    runs = []
    for prompt in ids:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.config.eos_token_id)
        logits = torch.cat(out.logits).float().cpu()
        top2 = logits.topk(2, dim=-1).values
        runs.append(Run(out.sequences[0, len(prompt):].tolist(), logits[0].numpy(),
                        (top2[:, 0] - top2[:, 1]).tolist()))
    return Reference(runs, ids, [ollama_text(prompt_format, c) for c in prompts])


def load_gguf(path: Path, n_ctx: int, lora: Path | None = None):
    """llama.cpp's default thread count: its spin-waiting threads crawl when every core is asked for and one is busy."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_gpu_layers=-1, verbose=False,
                           lora_path=str(lora) if lora else None)


def gguf_run(llm, ids: list[int], steps: int = GREEDY_STEPS) -> Run:
    """Greedy decoding in llama.cpp from the same ids (ours, not llama.cpp's re-tokenization)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if tokens[-1] == llm.token_eos():
            break
        llm.eval([tokens[-1]])
    return Run(tokens, first, [])


def llama_cpp_facts(path: Path, ids: list[list[int]], texts: list[str], lora: Path | None = None) -> dict:
    """Everything a check needs from llama.cpp (greedy runs from the ids, its tokenization of the texts, the file's
    metadata), computed in a child process by `run_isolated`: llama.cpp dying there (SIGILL where it was built for
    another CPU) is reported instead of ending the export."""
    llm = load_gguf(path, n_ctx=max(map(len, ids)) + GREEDY_STEPS + 8, lora=lora)
    return {"runs": [gguf_run(llm, i) for i in ids], "tokenized": [llama_cpp_tokenize(llm, t) for t in texts],
            "metadata": {"tokenizer": llm.metadata.get("tokenizer.ggml.model"), "n_vocab": llm.n_vocab(),
                         "add_bos_token": llm.metadata.get("tokenizer.ggml.add_bos_token"),
                         "chat_template": llm.metadata.get("tokenizer.chat_template"),
                         "file_type": llm.metadata.get("general.file_type")}}


def compare(ref: Run, got: Run) -> dict:
    """Logit and greedy-token agreement of one prompt; `split` is the first step where the tokens part."""
    import numpy as np

    a, b = ref.first_logits.astype(np.float64), got.first_logits.astype(np.float64)
    length = max(len(ref.tokens), len(got.tokens))
    same = [i < len(ref.tokens) and i < len(got.tokens) and ref.tokens[i] == got.tokens[i] for i in range(length)]
    split = same.index(False) if False in same else None
    near_tie = next((i for i, m in enumerate(ref.margins) if m < NEAR_TIE), None)
    return {"max_abs_diff": float(np.abs(a - b).max()),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "agreement": sum(same) / length, "split": split,
            "margin_at_split": ref.margins[split] if split is not None and split < len(ref.margins) else None,
            "first_near_tie": near_tie}


def f16_failure(m: dict) -> str | None:
    """Why f16 does not match the reference, or None: tokens must agree up to the first near-tie, logits closely."""
    if m["cosine"] < MIN_COSINE:
        return f"logits cosine {m['cosine']:.6f} < {MIN_COSINE}"
    if m["split"] is not None and (m["first_near_tie"] is None or m["split"] < m["first_near_tie"]):
        return f"greedy tokens part at step {m['split']} with HF margin {m['margin_at_split']:.4f} >= {NEAR_TIE}"
    return None


def llama_cpp_check(what: str, model: Path, ref: Reference, lora: Path | None = None) -> dict:
    """llama.cpp's figures for `model` (with `lora` applied) against the reference, measured in a child process. If
    llama.cpp dies there, the entry says why (`not_checked`, `signal`) and the export goes on with the next file."""
    try:
        facts = isolate.run_isolated(f"llama.cpp's check of {what}", llama_cpp_facts, model, ref.ids, ref.texts, lora)
    except isolate.ChildCrashed as crash:
        return {"not_checked": str(crash), "signal": crash.signal, "problems": []}
    except isolate.ChildFailed as err:
        return {"not_checked": str(err), "problems": [f"llama.cpp could not run it ({err})"]}
    tokenizer_ok = facts["tokenized"] == ref.ids
    problems = [] if tokenizer_ok else ["llama.cpp's tokenizer does not give Mistral's ids for the rendered prompts"]
    return {"prompts": [compare(r, g) for r, g in zip(ref.runs, facts["runs"], strict=True)],
            "tokenizer_ok": tokenizer_ok, "metadata": facts["metadata"], "problems": problems}


def mismatches(entry: dict) -> list[str]:
    """Where a strictly checked file's runs do not match the reference as an f16 file must."""
    if not entry["strict"] or "prompts" not in entry:
        return []
    return [f"prompt {n}: {why}" for n, m in enumerate(entry["prompts"]) if (why := f16_failure(m))]


def check_file(path: Path, gguf_type: str, ref: Reference, chat_template: str, gguf_tokenizer: str) -> dict:
    """One GGUF of the full export against the reference: f16 must match, every file carries the model's tokenizer
    (`gguf_tokenizer`: llama.cpp's name for its kind) and the chat template."""
    entry = {"file": path.name, "type": gguf_type, "bytes": path.stat().st_size, "strict": gguf_type == "f16"}
    entry |= llama_cpp_check(path.name, path, ref)
    entry["problems"] += mismatches(entry)
    if "metadata" in entry:
        meta = entry["metadata"]
        meta["chat_template_ok"] = meta.pop("chat_template") == chat_template
        if meta["tokenizer"] != gguf_tokenizer or not meta["chat_template_ok"]:
            entry["problems"].append(f"{gguf_tokenizer} tokenizer or chat template missing from the GGUF metadata")
    return entry
