"""The export's last words: where its files are, each with its check's verdict, and the commands that run them in
llama.cpp and Ollama (and infer.py). llama.cpp's commands say --jinja: its older built-in Mistral formats are not the
training prompt; the GGUF's template is (README: "The prompt in every runtime"). The details stay in export_report.json and llama.cpp.log beside the files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .errors import interpreter

LOG = "llama.cpp.log"  # llama.cpp's converter and quantizer output, in the export folder


def file_verdict(entry: dict) -> str:
    """One file's verdict in a few words, from its entry in export_report.json."""
    if "not_checked" in entry:
        return f"not checked: {entry['not_checked']}"
    if entry["problems"]:
        return f"FAIL: {entry['problems'][0]}"
    if "tensors" in entry:
        return f"ok: its {entry['tensors']['compared']} tensors are the merged model's"
    if entry.get("strict"):
        return "ok: agrees with the merged model"
    agreement = sum(m["agreement"] for m in entry["prompts"]) / len(entry["prompts"])
    return f"reported: greedy agreement {agreement:.0%} with the merged model (quantized)"


def ollama_name(adapter_dir: Path) -> str:
    """A model name Ollama takes, from the training folder's name (`outputs/mistral-qlora` -> `mistral-qlora`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", adapter_dir.resolve().name.lower()).strip("-.") or "my-model"


def closing_summary(folder: Path, adapter_dir: Path, report: dict, modelfile_from: str | None) -> str:
    """The lines the export ends with. `modelfile_from`: the GGUF the Modelfile's FROM names (None: adapter route)."""
    q = shlex.quote
    lines = [f"done: the export is in {folder}"]
    for entry in report["files"]:
        lines.append(f"  {entry['file']:<20} {entry['bytes'] / 2**20:8.1f} MiB  {file_verdict(entry)}")
    if (folder / "merged").is_dir():
        lines.append(f"  {'merged/':<20} {'':>12}  the merged 16-bit model (safetensors), which infer.py runs too")
    lines.append(f"  {'Modelfile':<20} {'':>12}  for Ollama; details in export_report.json, llama.cpp's output in {LOG}")
    name = ollama_name(adapter_dir)
    ollama = f"ollama create {name} -f {q(str(folder / 'Modelfile'))} && ollama run {name}"
    if modelfile_from is None:  # the adapter route: on a base GGUF
        base = report["files"][0].get("base_gguf", "BASE.gguf")
        adapter = q(str(folder / "adapter.gguf"))
        lines += ["run it:",
                  f"  llama.cpp:  llama-cli -m {q(base)} --lora {adapter} -cnv --jinja "
                  f"--chat-template-file {q(str(folder / 'chat_template.jinja'))}",
                  f"  Ollama:     {ollama}    (Ollama 0.34.0 or older: newer ones refuse ADAPTER)",
                  f"  here:       {interpreter()} infer.py {q(base)} --lora {adapter} --chat"]
    else:
        model = q(str(folder / modelfile_from))
        lines += ["run it:",
                  f"  llama.cpp:  llama-cli -m {model} -cnv --jinja",
                  f"  Ollama:     {ollama}",
                  f"  here:       {interpreter()} infer.py {model} --chat"]
    return "\n".join(lines)
