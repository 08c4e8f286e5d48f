"""The export's report: export_report.json, written last (it vouches for the files beside it); the table of its files'
checks and the runtimes' lines printed from it; the verdict that fails the export; and the export's last words.

The last words say where its files are, each with its check's verdict, and the commands that run them in llama.cpp and
Ollama (and infer.py). llama.cpp's commands say --jinja: its older built-in Mistral formats are not the training
prompt; the GGUF's template is (README: "The prompt in every runtime"). The details stay in export_report.json and
llama.cpp.log beside the files.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from . import atomic, isolate
from .errors import interpreter
from .export_job import ADAPTER_GGUF, LLAMA_CPP_TEMPLATE, LOG, REPORT, ExportError, ExportJob
from .gguf_check import GREEDY_STEPS, MIN_COSINE, NEAR_TIE

OLD_OLLAMA = "Ollama 0.34.0 or older: newer ones refuse ADAPTER"  # the adapter route's Modelfile


def write_report(job: ExportJob, files: list[dict], runtime_checks: list[dict] | None = None) -> dict:
    """The report, the export's last file: it vouches for the files beside it."""
    report = {"base": job.base, "base_note": job.base_note, "adapter_dir": str(job.adapter_dir),
              "criteria": {"near_tie": NEAR_TIE, "min_cosine_f16": MIN_COSINE, "greedy_steps": GREEDY_STEPS},
              "files": files, "runtimes": runtime_checks or []}
    atomic.write_text(job.folder / REPORT, json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- printed at the end of the export


def worst_figures(file: dict) -> dict:
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
        name = f"{f['file']} on {Path(f['base_gguf']).name}" if "base_gguf" in f else f["file"]
        if "tensors" in f and "not_checked" not in f:
            verdict = "FAIL" if f["problems"] else file_verdict(f)
            rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | - | - | - | - | - | {verdict} ({f['llama_cpp']}) |")
            continue
        if "prompts" not in f:
            rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | - | - | - | - | - | {file_verdict(f)} |")
            continue
        s = worst_figures(f)
        verdict = "FAIL" if f["problems"] else "ok" if f["strict"] else "reported"
        margin = "-" if s["margin"] is None else f"{s['margin']:.4f}"
        rows.append(f"| {name} | {f['bytes'] / 2**20:.1f} | {s['max_abs_diff']:.4f} | {s['cosine']:.6f} | "
                    f"{s['agreement']:.1%} | {'-' if s['split'] is None else s['split']} | {margin} | {verdict} |")
    return "\n".join(rows)


def runtime_lines(report: dict) -> str:
    """One line a runtime: how many conversations it renders to the training ids (see qlora/runtimes.py)."""
    lines = ["runtimes (the ids each gives a conversation, against training's):"]
    for r in report["runtimes"]:
        if "not_checked" in r:
            lines.append(f"  {r['runtime']}: not checked: {r['not_checked']}")
            continue
        status = "FAIL" if r["problems"] else "ok"
        edges = f"; {r['edges']} differ only at a known edge: {r['edge_note']}" if r["edges"] else ""
        lines.append(f"  {r['runtime']}: {status}, {r['equal']} of {r['conversations']} conversations{edges}")
    return "\n".join(lines)


def verdict(report: dict) -> None:
    """Raise when llama.cpp died in a check (the files stay; the message names them, the signal and the rebuild), on
    an f16 file that disagrees with the merged model, or on any file with a tokenizer/metadata fault."""
    crashed = [f for f in report["files"] if "signal" in f]
    problems = [f"{f['file']}: {why}" for f in report["files"] for why in f["problems"]]
    problems += [why for r in report["runtimes"] for why in r["problems"]]
    also = f"; also {problems[0]} ({len(problems)} problem(s))" if problems else ""
    if crashed:
        raise ExportError(f"{', '.join(f['not_checked'] for f in crashed)}: the GGUF files are written, the checks "
                          f"that could not run are marked in export_report.json{also}; rebuild llama-cpp-python for "
                          f"this CPU with `{isolate.REBUILD_LLAMA_CPP}`")
    if problems:
        raise ExportError(f"{problems[0]} ({len(problems)} problem(s); see export_report.json)")


# ---------------------------------------------------------------- the export's last words


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
    return f"reported: greedy agreement {worst_figures(entry)['agreement']:.0%} with the merged model (quantized)"


def ollama_name(adapter_dir: Path) -> str:
    """A model name Ollama takes, from the training folder's name (`outputs/mistral-qlora` -> `mistral-qlora`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", adapter_dir.resolve().name.lower()).strip("-.") or "my-model"


def closing_summary(folder: Path, adapter_dir: Path, report: dict, modelfile_from: str | None) -> str:
    """The lines the export ends with. `modelfile_from`: the GGUF the Modelfile's FROM names (None: adapter route)."""
    lines = [f"done: the export is in {folder}"]
    for entry in report["files"]:
        lines.append(f"  {entry['file']:<20} {entry['bytes'] / 2**20:8.1f} MiB  {file_verdict(entry)}")
    if (folder / "merged").is_dir():
        lines.append(f"  {'merged/':<20} {'':>12}  the merged 16-bit model (safetensors), which infer.py runs too")
    lines.append(f"  {'Modelfile':<20} {'':>12}  for Ollama; details in export_report.json, "
                 f"llama.cpp's output in {LOG}")
    commands = run_commands(folder, adapter_dir, modelfile_from, report["files"][0].get("base_gguf", "BASE.gguf"))
    lines.append("run it:")
    for runtime, command in commands.items():
        old = f"    ({OLD_OLLAMA})" if runtime == "Ollama" and modelfile_from is None else ""
        lines.append(f"  {runtime + ':':<11} {command}{old}")
    return "\n".join(lines)


def run_commands(folder: Path, adapter_dir: Path, modelfile_from: str | None, base_gguf: str) -> dict[str, str]:
    """The commands that run the export in llama.cpp, in Ollama and in infer.py (`here`), its files named as in
    `folder` (`.` for the model card: the files beside it). `modelfile_from`: the GGUF the Modelfile's FROM names
    (None: the adapter route, on the base GGUF `base_gguf`)."""
    q = shlex.quote
    name = ollama_name(adapter_dir)
    ollama = f"ollama create {name} -f {q(str(folder / 'Modelfile'))} && ollama run {name}"
    if modelfile_from is None:
        adapter = q(str(folder / ADAPTER_GGUF))
        return {"llama.cpp": f"llama-cli -m {q(base_gguf)} --lora {adapter} -cnv --jinja "
                             f"--chat-template-file {q(str(folder / LLAMA_CPP_TEMPLATE))}",
                "Ollama": ollama,
                "here": f"{interpreter()} infer.py {q(base_gguf)} --lora {adapter} --chat"}
    model = q(str(folder / modelfile_from))
    return {"llama.cpp": f"llama-cli -m {model} -cnv --jinja",
            "Ollama": ollama,
            "here": f"{interpreter()} infer.py {model} --chat"}
