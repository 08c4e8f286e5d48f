"""Adapter -> merged 16-bit model -> GGUF files (f16, then quantized) -> Ollama Modelfile, each file checked.

The GGUF converter is llama.cpp's own `convert_hf_to_gguf.py`, taken from llama-cpp-python's source distribution by
`scripts/get_llama_cpp_converter.sh` (no git, no cmake, nothing fetched at export time); quantization is llama.cpp's,
called through llama-cpp-python. Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import atomic
from .chat import MISTRAL_CHAT_TEMPLATE, Conversation, Message, PromptFormat, find_tokenizer_model
from .config import Config, to_yaml
from .hub import fetching
from .model import LOCAL_BASE

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/
CONVERTER_DIR = ROOT / ".llama.cpp"
INSTALL_CONVERTER = "sh scripts/get_llama_cpp_converter.sh"

# 4-bit repos whose 16-bit original is known: merging into the original avoids NF4's rounding of the base weights.
KNOWN_16BIT = {
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.2",
    "unsloth/mistral-7b-instruct-v0.3-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.3",
    "unsloth/mistral-7b-v0.3-bnb-4bit": "mistralai/Mistral-7B-v0.3",
    "unsloth/mistral-7b-bnb-4bit": "mistralai/Mistral-7B-v0.1",
}

# Bits per weight of each GGUF type on Mistral 7B (llama.cpp's mixes keep some tensors at higher precision), rounded
# up: only used to check the disk space before starting.
GGUF_BITS = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6, "q5_0": 5.5, "q4_k_m": 4.9,
             "q4_k_s": 4.6, "q4_0": 4.6, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4}
OLLAMA_PREFERRED = "q4_k_m"  # Ollama's own default quantization: the Modelfile's FROM when it was written

NEAR_TIE = 1e-2  # HF top-2 logit margin under which f16 rounding may legitimately flip the greedy choice
MIN_COSINE = 0.9999  # f16 next-token logits must match the float32 reference at least this well
GREEDY_STEPS = 32
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors") + TOKENIZER_FILES

# Prompts the finished files are checked on: single-turn, with a system message, and multi-turn.
CHECK_PROMPTS = [
    [Message("user", "What is the capital of France?")],
    [Message("system", "You are a concise assistant."), Message("user", "Write a haiku about autumn leaves.")],
    [Message("user", "Add 12 and 30."), Message("assistant", "12 plus 30 is 42."),
     Message("user", "Now subtract 5 from that.")],
]

# Ollama renders this with Go's text/template and then prepends <s> itself (the GGUF says add_bos_token), so the
# model sees exactly the training ids: `<s>[INST] {system}\n\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]`.
# A literal <s> here would give two BOS tokens. The else branch serves Ollama versions without .Messages, which
# execute the template once per turn with .System/.Prompt/.Response.
OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ end }}{{ .Content }} [/INST]
{{- $system = "" }}
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }} [/INST]{{ if .Response }} {{ .Response }}</s>{{ end }}
{{- end }}"""


class ExportError(RuntimeError):
    """An export that cannot go on: the message names the file or setting and what to do."""


@dataclass
class Plan:
    adapter_dir: Path
    export_dir: Path
    base: str
    base_note: str
    dequantize: bool
    gguf_types: list[str]
    system_prompt: str | None  # the Modelfile's SYSTEM

    @property
    def merged_dir(self) -> Path:
        return self.export_dir / "merged"

    def gguf(self, gguf_type: str) -> Path:
        return self.export_dir / f"model-{gguf_type}.gguf"


# ---------------------------------------------------------------- planning


def resolve_base(adapter_dir: Path, base_model_16bit: str | None) -> tuple[str, bool, str]:
    """(base to merge into, whether it must be dequantized, a sentence saying which and why)."""
    from .model import adapter_base

    if base_model_16bit:
        return base_model_16bit, False, f"merging into {base_model_16bit} (--base_model_16bit)"
    trained_on = adapter_base(adapter_dir)
    if trained_on in KNOWN_16BIT:
        original = KNOWN_16BIT[trained_on]
        return original, False, f"merging into {original}, the 16-bit original of {trained_on}"
    if "bnb-4bit" in trained_on or _is_quantized(trained_on):
        return trained_on, True, (f"no known 16-bit original of {trained_on}: dequantizing its 4-bit weights "
                                  f"(pass --base_model_16bit to merge into the original instead)")
    return trained_on, False, f"merging into {trained_on}, the base the adapter was trained on"


def _is_quantized(base: str) -> bool:
    from transformers import AutoConfig

    with fetching(base, "base model", LOCAL_BASE):
        return getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None


def gguf_types(requested: list[str]) -> list[str]:
    """f16 first (the source of every quantization and the file checked strictly), then the others in order."""
    unknown = [t for t in requested if t.lower() not in GGUF_BITS]
    if unknown:
        raise ExportError(f"--gguf_types: unknown type(s) {', '.join(unknown)}; choose from {', '.join(GGUF_BITS)}")
    return ["f16"] + [t for t in dict.fromkeys(t.lower() for t in requested) if t != "f16"]


def plan(config: Config) -> Plan:
    adapter_dir = Path(config.adapter_dir or config.output_dir)
    export_dir = Path(config.export_dir or adapter_dir / "export")
    if config.merged_only and config.lora_only:
        raise ExportError("--merged_only and --lora_only exclude each other; pass one")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter or training output folder)")
    system = config.system_prompt or trained_system_prompt(adapter_dir)
    if '"""' in (system or ""):
        raise ExportError('system_prompt: cannot contain """ (the quote of Ollama\'s Modelfile)')
    types = gguf_types(config.gguf_types)
    if config.lora_only:
        return Plan(adapter_dir, export_dir, "", "writing the adapter alone", False, [], None)
    base, dequantize, note = resolve_base(adapter_dir, config.base_model_16bit)
    return Plan(adapter_dir, export_dir, base, note, dequantize, [] if config.merged_only else types, system)


def trained_system_prompt(adapter_dir: Path) -> str | None:
    """The system prompt of the training run (its config.yaml), so that Ollama's default matches what was learnt."""
    saved = adapter_dir / "config.yaml"
    if not saved.is_file():
        return None
    return (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("system_prompt")


def parameter_count(base: str) -> int:
    """Parameters of the base's architecture, counted on the meta device (no weights read or downloaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with fetching(base, "base model", LOCAL_BASE):
        architecture = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    return sum(p.numel() for p in model.parameters())


def estimated_bytes(p: Plan, lora_only: bool) -> dict[str, int]:
    """Final size of every file the export will write, by name."""
    if lora_only:
        return {"adapter": sum(f.stat().st_size for f in p.adapter_dir.iterdir() if f.name in ADAPTER_FILES)}
    n = parameter_count(p.base)
    sizes = {"merged": 2 * n}
    sizes.update({p.gguf(t).name: int(n * GGUF_BITS[t] / 8) for t in p.gguf_types})
    return sizes


def check_disk_space(folder: Path, sizes: dict[str, int], margin: float = 1.1) -> None:
    """Fail before any work when the export's files would not fit (HF cache downloads not counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = int(sum(sizes.values()) * margin)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ExportError(f"{folder}: {needed / 2**30:.1f} GiB needed for {', '.join(sizes)} "
                          f"but only {free / 2**30:.1f} GiB free")


# ---------------------------------------------------------------- merge


def merge(adapter_dir: Path, base: str, target: Path, dequantize: bool = False) -> None:
    """Base in float16 + adapter, merged (PEFT merge_and_unload), saved as safetensors with tokenizer and generation
    config. float16 rather than Mistral's bfloat16: the LoRA update survives rounding 8x better, and the f16 GGUF is
    then a lossless copy of the merged weights."""
    model = merge_adapter(_load_peft(adapter_dir, base, dequantize))
    save_merged(model, adapter_dir, base, target)


def _load_peft(adapter_dir: Path, base: str, dequantize: bool):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import load_with_adapter

    if not dequantize:
        return load_with_adapter(adapter_dir, base, dtype=torch.float16, device="cpu")
    if not torch.cuda.is_available():
        raise ExportError(f"{base}: dequantizing a 4-bit model needs a CUDA GPU; on this machine pass "
                          f"--base_model_16bit with its 16-bit original")
    with fetching(base, "base model", LOCAL_BASE):
        quantized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, device_map={"": 0})
    return PeftModel.from_pretrained(quantized.dequantize().to("cpu", torch.float16), str(adapter_dir)).eval()


def merge_adapter(peft_model):
    """The plain transformers model with the LoRA update added to its weights (checked for NaNs)."""
    return peft_model.merge_and_unload(safe_merge=True)


def save_merged(model, adapter_dir: Path, base: str, target: Path) -> None:
    with atomic.atomic_dir(target) as tmp:
        model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        save_tokenizer(adapter_dir, base, tmp)


def save_tokenizer(adapter_dir: Path, base: str, target: Path) -> None:
    """The adapter's tokenizer files (else the base's) plus `tokenizer.model`, which transformers 5 does not write
    and without which llama.cpp's converter falls back on tokenizer.json and tokenizes unlike Mistral."""
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    with fetching(source, "base model", LOCAL_BASE):
        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = tokenizer.chat_template or MISTRAL_CHAT_TEMPLATE  # lands in the GGUF metadata
    tokenizer.save_pretrained(target)
    sp_model = adapter_dir / "tokenizer.model"
    shutil.copyfile(sp_model if sp_model.is_file() else find_tokenizer_model(base, instead=LOCAL_BASE),
                    target / "tokenizer.model")


def copy_adapter(adapter_dir: Path, target: Path) -> None:
    with atomic.atomic_dir(target) as tmp:
        for f in adapter_dir.iterdir():
            if f.name in ADAPTER_FILES:
                shutil.copyfile(f, tmp / f.name)


# ---------------------------------------------------------------- GGUF


def find_converter() -> Path:
    """The folder with llama.cpp's converter: $LLAMA_CPP_CONVERTER, else .llama.cpp/ in the repository."""
    folder = Path(os.environ.get(CONVERTER_ENV) or CONVERTER_DIR)
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise ExportError(f"{folder}: llama.cpp's converter is missing; run `{INSTALL_CONVERTER}` "
                          f"(or set {CONVERTER_ENV} to a folder with convert_hf_to_gguf.py and gguf-py/)")
    _check_converter_version(folder)
    return folder


def _check_converter_version(folder: Path) -> None:
    """A converter newer or older than the llama.cpp inside llama-cpp-python may write files it cannot read."""
    from importlib.metadata import version

    stamp = folder / "VERSION"  # written by the install script; absent from a converter set up by hand
    if not stamp.is_file():
        return
    made_for, installed = stamp.read_text().strip(), version("llama-cpp-python")
    if made_for != installed:
        raise ExportError(f"{stamp}: converter from llama-cpp-python {made_for} but {installed} is installed; "
                          f"run `{INSTALL_CONVERTER}` again")


def convert_f16(merged_dir: Path, target: Path, converter: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py in a subprocess, its own gguf-py first on the path (PyPI's gguf lags)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(converter / "gguf-py"), os.environ.get("PYTHONPATH")])))
    with atomic.atomic_path(target) as tmp:
        result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir),
                                 "--outtype", "f16", "--outfile", str(tmp)], env=env)
        if result.returncode != 0:
            raise ExportError(f"{target}: llama.cpp's converter failed (exit {result.returncode}); see its log above")


def quantize(f16_path: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer on every core; its per-tensor log lines are the progress display."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # every core
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log at this level or above
    level = log.level
    log.setLevel(logging.INFO)
    try:
        with atomic.atomic_path(target) as tmp:
            if llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params) != 0:
                raise ExportError(f"{target}: llama.cpp could not quantize {f16_path.name} to {gguf_type}")
    finally:
        log.setLevel(level)


def modelfile(gguf_name: str, system: str | None) -> str:
    """Ollama Modelfile: Mistral-Instruct's prompt, stops on the next turn or end of answer, optional SYSTEM."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
             'PARAMETER stop "[INST]"', 'PARAMETER stop "</s>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def modelfile_target(types: list[str]) -> str:
    return OLLAMA_PREFERRED if OLLAMA_PREFERRED in types else types[-1]


# ---------------------------------------------------------------- checks


def rendered_text(prompt_format: PromptFormat, conversation: Conversation) -> str:
    """The training ids as text, `<s>`/`</s>` spelled out: what SentencePiece decoding of each segment gives."""
    ids, _ = prompt_format.encode(conversation)
    text, run = "", []
    for i in ids + [None]:
        if i in (prompt_format.bos, prompt_format.eos, None):
            text += prompt_format.sp.decode(run) + (prompt_format.sp.id_to_piece(i) if i is not None else "")
            run = []
        else:
            run.append(i)
    return text


def llama_cpp_ids(llm, prompt_format: PromptFormat, conversation: Conversation) -> list[int]:
    """llama.cpp's own tokenization of the rendered text, as Ollama does it: BOS added, not spelled out."""
    text = rendered_text(prompt_format, conversation).removeprefix(prompt_format.sp.id_to_piece(prompt_format.bos))
    return llm.tokenize(text.encode(), add_bos=True, special=True)


@dataclass
class Run:
    tokens: list[int]
    first_logits: object  # numpy array: the next-token logits after the prompt
    margins: list[float]  # HF only: top-2 logit margin at each greedy step


def reference_runs(merged_dir: Path, prompts: list[list[int]], steps: int = GREEDY_STEPS) -> list[Run]:
    """Greedy decoding of the merged HF model in float32 (on the GPU when there is one): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device).eval()
    runs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.config.eos_token_id)
        logits = torch.cat(out.logits).float().cpu()
        top2 = logits.topk(2, dim=-1).values
        runs.append(Run(out.sequences[0, len(ids):].tolist(), logits[0].numpy(), (top2[:, 0] - top2[:, 1]).tolist()))
    return runs


def load_gguf(path: Path, n_ctx: int):
    """llama.cpp's default thread count: its spin-waiting threads crawl when every core is asked for and one is busy."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_gpu_layers=-1, verbose=False)


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


def check_file(path: Path, gguf_type: str, refs: list[Run], prompts: list[Conversation], ids: list[list[int]],
               prompt_format: PromptFormat, chat_template: str) -> dict:
    """One GGUF against the reference runs: per-prompt figures, tokenizer and metadata, and its verdict."""
    llm = load_gguf(path, n_ctx=max(map(len, ids)) + GREEDY_STEPS + 8)
    per_prompt = [compare(ref, gguf_run(llm, i)) for ref, i in zip(refs, ids, strict=True)]
    tokenizer_ok = all(llama_cpp_ids(llm, prompt_format, c) == i for c, i in zip(prompts, ids, strict=True))
    meta = {"tokenizer": llm.metadata.get("tokenizer.ggml.model"), "n_vocab": llm.n_vocab(),
            "add_bos_token": llm.metadata.get("tokenizer.ggml.add_bos_token"),
            "chat_template_ok": llm.metadata.get("tokenizer.chat_template") == chat_template}
    failures = [f16_failure(m) for m in per_prompt] if gguf_type == "f16" else []
    problems = [f"prompt {n}: {why}" for n, why in enumerate(failures) if why]
    if not tokenizer_ok:
        problems.append("llama.cpp's tokenizer does not give Mistral's ids for the rendered prompts")
    if meta["tokenizer"] != "llama" or not meta["chat_template_ok"]:
        problems.append("SentencePiece tokenizer or chat template missing from the GGUF metadata")
    return {"file": path.name, "type": gguf_type, "bytes": path.stat().st_size, "prompts": per_prompt,
            "tokenizer_ok": tokenizer_ok, "metadata": meta, "problems": problems}


def check_exports(p: Plan, prompts: list[Conversation] = CHECK_PROMPTS) -> dict:
    """Every GGUF of the plan against the merged model; the report is written whatever the verdict."""
    from transformers import AutoTokenizer

    prompt_format = PromptFormat(p.merged_dir / "tokenizer.model")
    ids = [prompt_format.prompt_ids(c) for c in prompts]
    refs = reference_runs(p.merged_dir, ids)
    chat_template = AutoTokenizer.from_pretrained(p.merged_dir).chat_template
    files = [check_file(p.gguf(t), t, refs, prompts, ids, prompt_format, chat_template) for t in p.gguf_types]
    report = {"base": p.base, "base_note": p.base_note, "adapter_dir": str(p.adapter_dir),
              "criteria": {"near_tie": NEAR_TIE, "min_cosine_f16": MIN_COSINE, "greedy_steps": GREEDY_STEPS},
              "files": files}
    atomic.write_text(p.export_dir / "export_report.json", json.dumps(report, indent=2) + "\n")
    return report


def summary(file: dict) -> dict:
    """The worst figures over a file's prompts, for the table."""
    prompts = file["prompts"]
    splits = [m for m in prompts if m["split"] is not None]
    first = min(splits, key=lambda m: m["split"]) if splits else None
    return {"max_abs_diff": max(m["max_abs_diff"] for m in prompts), "cosine": min(m["cosine"] for m in prompts),
            "agreement": sum(m["agreement"] for m in prompts) / len(prompts),
            "split": first["split"] if first else None, "margin": first["margin_at_split"] if first else None}


def table(report: dict) -> str:
    rows = ["| file | MiB | max abs diff | cosine | greedy agreement | first split | HF margin there | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for f in report["files"]:
        s = summary(f)
        verdict = "FAIL" if f["problems"] else "ok" if f["type"] == "f16" else "reported"
        margin = "-" if s["margin"] is None else f"{s['margin']:.4f}"
        rows.append(f"| {f['file']} | {f['bytes'] / 2**20:.1f} | {s['max_abs_diff']:.4f} | {s['cosine']:.6f} | "
                    f"{s['agreement']:.1%} | {'-' if s['split'] is None else s['split']} | {margin} | {verdict} |")
    return "\n".join(rows)


def verdict(report: dict) -> None:
    """Raise on an f16 file that disagrees with the merged model, or on any file with a tokenizer/metadata fault."""
    problems = [f"{f['file']}: {why}" for f in report["files"] for why in f["problems"]]
    if problems:
        raise ExportError(f"{problems[0]} ({len(problems)} problem(s); see export_report.json)")


# ---------------------------------------------------------------- the whole export


def run_export(config: Config, prompts: list[Conversation] = CHECK_PROMPTS) -> Plan:
    p = plan(config)
    converter = find_converter() if p.gguf_types else None
    print(p.base_note, flush=True)
    check_disk_space(p.export_dir, estimated_bytes(p, config.lora_only))
    atomic.remove_stale_temporaries(p.export_dir)
    atomic.write_text(p.export_dir / "config.yaml", to_yaml(config))
    if config.lora_only:
        copy_adapter(p.adapter_dir, p.export_dir / "adapter")
        return p
    merge(p.adapter_dir, p.base, p.merged_dir, p.dequantize)
    if config.merged_only:
        return p
    convert_f16(p.merged_dir, p.gguf("f16"), converter)
    for t in p.gguf_types[1:]:
        quantize(p.gguf("f16"), p.gguf(t), t)
    atomic.write_text(p.export_dir / "Modelfile", modelfile(p.gguf(modelfile_target(p.gguf_types)).name,
                                                            p.system_prompt))
    report = check_exports(p, prompts)
    print(table(report), flush=True)
    verdict(report)
    return p
