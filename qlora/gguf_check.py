"""Checks of a GGUF file against the merged Hugging Face model it came from, in llama.cpp.

The reference is the merged model in float32, decoding greedily from Mistral's own ids for each check prompt, computed
by teacher forcing on each file's own answers (one pass over the weights, which stay on disk; `reference_runs`).
llama.cpp decodes from the same ids (not its own tokenization, which is checked separately: it must give the same ids
from the text Ollama hands it). An f16 file must give the same greedy tokens up to the first near-tie and logits with
cosine at least MIN_COSINE; quantized files are reported. llama.cpp runs in a child process (`isolate.run_isolated`), so a crash
there (SIGILL where llama-cpp-python was built for another CPU) becomes an entry in the report, not the export's end.

llama.cpp maps a GGUF file and reads all of it for every token it decodes: from the page cache where the file fits in
the RAM available, else from disk again each time (13.5 GiB a token for a 7 B f16 file in a standard Colab session's
12.7 GB). A file that does not fit is not run there: an f16 file is checked tensor by tensor against the merged
safetensors instead (`tensor_check`: each tensor as llama.cpp's converter writes it, to the bit), with llama.cpp's
tokenizer and the file's metadata read from its vocabulary alone; the quantized files, which fit, run as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import isolate, ram
from .chat import Conversation, Message, PromptFormat

# HF top-2 logit margin under which f16 rounding may legitimately flip the greedy choice: this, or twice the largest
# difference between the file's first logits and the reference's, where that is more (both top logits may move by it,
# in opposite ways). llama.cpp's CPU kernels round activations to f16: on the 7.24 B stand-in the f16 file's logits
# were up to 0.027 off (cosine 0.999988), and its greedy run parted at a margin of 0.014.
NEAR_TIE = 1e-2
MIN_COSINE = 0.9999  # f16 next-token logits must match the float32 reference at least this well
GREEDY_STEPS = 32
RUN_MARGIN = 2**30  # RAM llama.cpp's context and this process need beside a mapped GGUF (a few hundred MiB measured)

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
class Prompts:
    """What every file is checked on: the prompts' ids (as in training), and the prompts as the text Ollama hands to
    llama.cpp (whose tokenization must give the same ids)."""
    ids: list[list[int]]
    texts: list[str]


def prompt_set(prompt_format: PromptFormat, conversations: list[Conversation]) -> Prompts:
    return Prompts([prompt_format.prompt_ids(c) for c in conversations],
                   [ollama_text(prompt_format, c) for c in conversations])


def load_reference(merged_dir: Path):
    """The merged HF model in float32, without a float32 copy of it in RAM: on the GPU when it fits there, else on
    the CPU with its weights left in the merged safetensors, where accelerate's offload hooks (`cpu_offload` over a
    lazy safetensors map) load each layer's weights in float32 just before it runs and drop them after."""
    import torch
    from accelerate import cpu_offload, init_empty_weights
    from accelerate.utils import OffloadedWeightsLoader
    from transformers import AutoConfig, AutoModelForCausalLM

    from .merge import tensor_names, weight_files

    config = AutoConfig.from_pretrained(merged_dir)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if reference_device(model) == "cuda":
        return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map={"": 0},
                                                    use_safetensors=True).eval()
    index = {name: {"safetensors_file": str(file), "weight_name": name}
             for file in weight_files(merged_dir) for name in tensor_names(file)}
    cpu_offload(model, execution_device=torch.device("cpu"), state_dict=OffloadedWeightsLoader(index=index))
    return model.eval()


def reference_device(model) -> str:
    """The GPU when `model` in float32 fits in its free memory with a fifth to spare, else the CPU: a 7 B reference
    takes 29 GB, more than a 16 or 24 GB card has."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if 1.2 * 4 * model.num_parameters() < torch.cuda.mem_get_info()[0] else "cpu"


def reference_runs(model, prompts: Prompts, continuations: dict[str, list[list[int]]]) -> dict[str, list[Run]]:
    """The reference's greedy runs against each file's: every prompt followed by the tokens the file chose, all in one
    batched forward pass (teacher forcing, so the weights are read once). Up to the first step where the reference
    would choose another token, its greedy run is the file's, so its tokens up to and including that step, and the
    top-2 margins there, are exactly those of its own greedy decoding: the split, the near-ties before it and the
    first logits come out as from `generate`, for one pass over the weights instead of one a step."""
    keys = [(name, n) for name, runs in continuations.items() for n in range(len(runs))]
    sequences = [prompts.ids[n] + continuations[name][n][:-1] for name, n in keys]
    logits = forward(model, sequences)
    runs = {name: [] for name in continuations}
    for (name, n), row in zip(keys, logits, strict=True):
        steps = row[len(prompts.ids[n]) - 1:]
        tokens, margins = [], []
        for step, chosen in zip(steps, continuations[name][n]):
            top2 = step.topk(2)
            tokens.append(int(top2.indices[0]))
            margins.append(float(top2.values[0] - top2.values[1]))
            if tokens[-1] != chosen:
                break
        runs[name].append(Run(tokens, steps[0].numpy(), margins))
    return runs


def forward(model, sequences: list[list[int]]):
    """Float32 logits at every position of each sequence (right-padded into one batch: a causal model's logits at the
    real positions never see the padding after them), on the CPU."""
    import torch

    width = max(map(len, sequences))
    device = "cpu" if model.device.type == "meta" else model.device  # offloaded: the hooks run it on the CPU
    batch = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
    with torch.no_grad():
        logits = model(batch).logits.float().cpu()
    return [logits[i, :len(s)] for i, s in enumerate(sequences)]


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
            "metadata": metadata(llm)}


def llama_cpp_vocab_facts(path: Path, texts: list[str]) -> dict:
    """The tokenization and metadata facts of `llama_cpp_facts` from the file's vocabulary alone (no weights read)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return {"tokenized": [llama_cpp_tokenize(llm, t) for t in texts], "metadata": metadata(llm)}


def metadata(llm) -> dict:
    return {"tokenizer": llm.metadata.get("tokenizer.ggml.model"), "n_vocab": llm.n_vocab(),
            "add_bos_token": llm.metadata.get("tokenizer.ggml.add_bos_token"),
            "chat_template": llm.metadata.get("tokenizer.chat_template"),
            "file_type": llm.metadata.get("general.file_type")}


def compare(ref: Run, got: Run) -> dict:
    """Logit and greedy-token agreement of one prompt; `split` is the first step where the tokens part."""
    import numpy as np

    a, b = ref.first_logits.astype(np.float64), got.first_logits.astype(np.float64)
    length = max(len(ref.tokens), len(got.tokens))
    same = [i < len(ref.tokens) and i < len(got.tokens) and ref.tokens[i] == got.tokens[i] for i in range(length)]
    split = same.index(False) if False in same else None
    max_abs_diff = float(np.abs(a - b).max())
    tie = max(NEAR_TIE, 2 * max_abs_diff)
    near_tie = next((i for i, m in enumerate(ref.margins) if m < tie), None)
    return {"max_abs_diff": max_abs_diff, "near_tie_margin": tie,
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "agreement": sum(same) / length, "split": split,
            "margin_at_split": ref.margins[split] if split is not None and split < len(ref.margins) else None,
            "first_near_tie": near_tie}


def f16_failure(m: dict) -> str | None:
    """Why f16 does not match the reference, or None: tokens must agree up to the first near-tie, logits closely."""
    if m["cosine"] < MIN_COSINE:
        return f"logits cosine {m['cosine']:.6f} < {MIN_COSINE}"
    if m["split"] is not None and (m["first_near_tie"] is None or m["split"] < m["first_near_tie"]):
        return (f"greedy tokens part at step {m['split']} with HF margin {m['margin_at_split']:.4f} >= "
                f"{m['near_tie_margin']:.4f} (a near-tie: {NEAR_TIE}, or twice the largest logit difference)")
    return None


def llama_cpp_run(what: str, facts, *args) -> dict:
    """llama.cpp's facts (`facts(*args)`: `llama_cpp_facts` or `llama_cpp_vocab_facts`), measured in a child process:
    {"facts": ...}. If llama.cpp dies there, an entry saying why (`not_checked`, `signal`) instead, and the export goes
    on with the next file."""
    try:
        return {"facts": isolate.run_isolated(f"llama.cpp's check of {what}", facts, *args)}
    except isolate.ChildCrashed as crash:
        return {"not_checked": str(crash), "signal": crash.signal, "problems": []}
    except isolate.ChildFailed as err:
        return {"not_checked": str(err), "problems": [f"llama.cpp could not run it ({err})"]}


def judged(outcome: dict, ref: list[Run] | None, prompts: Prompts) -> dict:
    """llama.cpp's figures against the reference's runs (an outcome without facts passes through)."""
    if "facts" not in outcome:
        return outcome
    facts = outcome["facts"]
    return {"prompts": [compare(r, g) for r, g in zip(ref, facts["runs"], strict=True)]} | vocabulary(facts, prompts)


def vocabulary(facts: dict, prompts: Prompts) -> dict:
    """Whether llama.cpp's tokenizer gives Mistral's ids for the rendered prompts, and the file's metadata."""
    tokenizer_ok = facts["tokenized"] == prompts.ids
    problems = [] if tokenizer_ok else ["llama.cpp's tokenizer does not give Mistral's ids for the rendered prompts"]
    return {"tokenizer_ok": tokenizer_ok, "metadata": facts["metadata"], "problems": problems}


def check_all(merged_dir: Path, files: dict[str, tuple[Path, Path | None]], prompts: Prompts,
              ram_bytes: int | None = None) -> dict[str, dict]:
    """Each file (name: its GGUF and the LoRA applied to it, or None) run in llama.cpp where it fits in `ram_bytes`
    (default: the RAM available now), then the merged model run once over all their answers; a file too large for
    that is checked by its tensors if it is f16, else marked not checked. The entries by name."""
    room = ram.available_bytes() if ram_bytes is None else ram_bytes
    sizes = {name: sum(f.stat().st_size for f in (path, lora) if f) for name, (path, lora) in files.items()}
    too_large = {name for name in files if sizes[name] + RUN_MARGIN > room}
    outcomes = {name: llama_cpp_run(name, llama_cpp_facts, path, prompts.ids, prompts.texts, lora)
                for name, (path, lora) in files.items() if name not in too_large}
    answered = {name: [run.tokens for run in o["facts"]["runs"]] for name, o in outcomes.items() if "facts" in o}
    refs = reference_runs(load_reference(merged_dir), prompts, answered) if answered else {}
    checked = {name: judged(outcome, refs.get(name), prompts) for name, outcome in outcomes.items()}
    for name in too_large:
        path, lora = files[name]
        why = f"{sizes[name] / 2**30:.1f} GiB does not fit in the {room / 2**30:.1f} GiB of RAM available"
        checked[name] = (by_tensors(path, merged_dir, prompts, why) if lora is None and is_f16(path)
                         else {"not_checked": f"not run in llama.cpp: {why}", "problems": []})
    return {name: checked[name] for name in files}


def is_f16(path: Path) -> bool:
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    return field is not None and int(field.contents()) == LlamaFileType.MOSTLY_F16


def by_tensors(path: Path, merged_dir: Path, prompts: Prompts, why: str) -> dict:
    """An f16 file too large to run in llama.cpp here: its tensors against the merged model's, and llama.cpp's
    tokenizer and the metadata from its vocabulary alone (in a child process, as every llama.cpp check)."""
    tensors = tensor_check(path, merged_dir)
    problems = [f"tensor {name}: {fault}" for name, fault in tensors["faults"].items()]
    entry = {"checked_by": "tensors", "tensors": tensors, "llama_cpp": f"not run: {why}"}
    outcome = llama_cpp_run(f"the vocabulary of {path.name}", llama_cpp_vocab_facts, path, prompts.texts)
    found = vocabulary(outcome.pop("facts"), prompts) if "facts" in outcome else outcome
    return entry | found | {"problems": problems + found["problems"]}


def tensor_check(path: Path, merged_dir: Path) -> dict:
    """Every tensor of an f16 GGUF against the merged safetensors it was converted from, one pair at a time: each must
    be what llama.cpp's converter makes of its merged tensor (its GGUF name, q and k rows in llama.cpp's rotary
    order, the file's type), bit for bit. The GGUF is read with plain reads at each tensor's offset, so its pages go
    to the page cache, which the kernel drops as it needs, not into this process's memory."""
    import gguf

    from .merge import tensor_names, weight_files

    reader = gguf.GGUFReader(path)  # memory-mapped: only its header is read
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, int(reader.fields[f"{arch_name}.block_count"].contents()))
    in_file = {t.name: t for t in reader.tensors}
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    faults, compared = {}, 0
    with open(path, "rb") as raw:
        for file in weight_files(merged_dir):
            for name in tensor_names(file):
                tensor = in_file.pop(names.get_name(name, try_suffixes=(".weight", ".bias")) or "", None)
                if tensor is None:
                    faults[name] = "missing from the GGUF"
                    continue
                expected = as_converted(read_tensor(file, name), name, config)
                fault = tensor_fault(expected, tensor, os.pread(raw.fileno(), tensor.n_bytes, tensor.data_offset))
                compared += 1
                if fault:
                    faults[tensor.name] = fault
    faults |= {name: "not in the merged model" for name in in_file}
    return {"compared": compared, "faults": faults}


def read_tensor(file: Path, name: str):
    """One tensor of a safetensors file, as a numpy array."""
    from safetensors import safe_open

    with safe_open(file, "np") as f:  # one tensor, then closed: no shard stays mapped (merged floats are float16)
        return f.get_tensor(name)


def as_converted(tensor, name: str, config: dict):
    """A merged tensor as llama.cpp's converter writes it for a Llama-family model (convert_hf_to_gguf.py's
    `LlamaModel.permute`): the rows of q and k from Hugging Face's rotary halves back to interleaved pairs."""
    heads = config["num_attention_heads"]
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = config.get("num_key_value_heads", heads)
    elif not name.endswith(("q_proj.weight", "q_proj.bias")):
        return tensor
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def tensor_fault(expected, tensor, data: bytes) -> str | None:
    """Why a GGUF tensor (its reader entry and raw bytes) is not `expected` in the file's type, or None."""
    import numpy as np

    dtype = {"F16": np.float16, "F32": np.float32}.get(tensor.tensor_type.name)
    if dtype is None:
        return f"type {tensor.tensor_type.name}, where an f16 file has F16 and F32"
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if shape != expected.shape:
        return f"shape {shape}, the merged model's {expected.shape}"
    got, want = np.frombuffer(data, dtype=dtype).reshape(shape), expected.astype(dtype)
    unequal = int(np.count_nonzero(got != want))
    if unequal:
        worst = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max())
        return f"{unequal:,} of {got.size:,} values differ (up to {worst:.3g})"
    return None


def mismatches(entry: dict) -> list[str]:
    """Where a strictly checked file's runs do not match the reference as an f16 file must."""
    if not entry["strict"] or "prompts" not in entry:
        return []
    return [f"prompt {n}: {why}" for n, m in enumerate(entry["prompts"]) if (why := f16_failure(m))]


def check_file(path: Path, gguf_type: str, checked: dict, chat_template: str, gguf_tokenizer: str) -> dict:
    """One GGUF of the full export against the reference: f16 must match, every file carries the model's tokenizer
    (`gguf_tokenizer`: llama.cpp's name for its kind) and the chat template."""
    entry = {"file": path.name, "type": gguf_type, "bytes": path.stat().st_size, "strict": gguf_type == "f16"}
    entry |= checked
    entry["problems"] = list(entry["problems"]) + mismatches(entry)
    if "metadata" in entry:
        meta = entry["metadata"]
        meta["chat_template_ok"] = meta.pop("chat_template") == chat_template
        if meta["tokenizer"] != gguf_tokenizer or not meta["chat_template_ok"]:
            entry["problems"].append(f"{gguf_tokenizer} tokenizer or chat template missing from the GGUF metadata")
    return entry
