"""Adapter -> merged 16-bit model -> GGUF files (f16, then quantized) -> Ollama Modelfile, each file checked; or, with
--lora_only, adapter -> adapter.gguf + a Modelfile that puts it on a base llama.cpp (or an older Ollama) already has.

Read `run_export` and the two routes below it (`export_merged`, `export_adapter`) top to bottom: each step is a call
into the module that does it. What to write where is decided first (qlora/export_job.py); then the merge
(qlora/merge.py), llama.cpp's converter and quantizer (qlora/gguf_convert.py), the Modelfile (qlora/modelfile.py), the
checks (qlora/gguf_check.py, qlora/runtimes.py) and the report (qlora/export_report.py).

The export is a transaction: it is built in a staging folder beside the export folder (`.export.tmp-PID`), its report
written last, and swapped in whole when complete (qlora/atomic.py's pattern one level up). A failed or killed export
leaves the old export as it was (or, killed in the instant between the swap's two renames, no export folder, which
the next export puts back). The merge streams the base tensor by tensor (qlora/merge.py) and the checks' reference
reads its weights layer by layer from disk (qlora/gguf_check.py), so neither holds the model in RAM.

Every file is written under a temporary name and renamed when complete. llama.cpp reads each finished file in a child
process (qlora/gguf_check.py): if it dies there (SIGILL where llama-cpp-python was built for another CPU), the files
stay, the report says which check could not run, and the export ends with one line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from . import atomic, runfolder, runtimes
from .chat import Conversation, PromptFormat, find_tokenizer_file, load_prompt_format, tokenizer_file_in
from .config import Config, to_yaml
from .export_job import (ADAPTER_FOLDER_FILES, ADAPTER_GGUF, LLAMA_CPP_TEMPLATE, ExportError, ExportJob,
                         estimated_bytes, is_export_output, job_for, modelfile_target, trained_setting)
from .export_report import closing_summary, run_commands, runtime_lines, table, verdict, write_report
from .gguf_check import CHECK_PROMPTS, check_all, check_file, mismatches, prompt_set
from .gguf_convert import (HF_CONVERTER, LORA_CONVERTER, LORA_OUTTYPE, convert_f16, convert_lora, find_converter,
                           quantize)
from .hub import LOCAL_BASE, fetching
from .merge import MergeError, base_checkout, dequantized_checkout, merge_into
from .model_card import CARD, PLOT, export_card, is_model_card
from .modelfile import modelfile, ollama_template
from .push import push_export

# llama.cpp file types (general.file_type) of bases an adapter is checked on strictly, as an f16 file is
STRICT_BASE_TYPES = ("ALL_F32", "MOSTLY_F16")


# ---------------------------------------------------------------- the whole export, in the order it happens


def run_export(config: Config, prompts: list[Conversation] = CHECK_PROMPTS) -> ExportJob:
    """export_gguf.py's work: the job decided from `config`, then run in its folder (one export at a time there)."""
    job = job_for(config)
    check_gpu(job.dequantize and not config.lora_only)
    with runfolder.locked(job.export_dir):  # one export at a time into a folder
        run_job(config, job, prompts)
        if config.push_to_hub:  # once every file is written and checked: a failed push loses none of them
            push_export(job.export_dir, config.push_to_hub, config.hub_private)
        return job


def run_job(config: Config, job: ExportJob, prompts: list[Conversation]) -> ExportJob:
    """Every file of the job and its model card written in a staging folder swapped in whole, then the report's table,
    its verdict and the export's last words."""
    needed = LORA_CONVERTER if config.lora_only else HF_CONVERTER if job.gguf_types else None
    converter = find_converter(needed) if needed else None
    print(job.base_note, flush=True)
    atomic.check_writable(job.export_dir)
    check_disk_space(job.export_dir, estimated_bytes(job, config.lora_only))
    with staged(job.export_dir) as job.work_dir:
        atomic.write_text(job.folder / "config.yaml", to_yaml(config))
        if config.lora_only:
            report = export_adapter(job, converter, prompts)
        else:
            report = export_merged(job, converter, config.merged_only, prompts)
        modelfile_from = job.gguf(modelfile_target(job.gguf_types)).name if job.gguf_types else None  # None: no GGUF
        write_card(job, report, modelfile_from)
    job.work_dir = None
    if report is not None:
        print(table(report), flush=True)
        if report["runtimes"]:
            print(runtime_lines(report), flush=True)
        verdict(report)
        print(closing_summary(job.export_dir, job.adapter_dir, report, modelfile_from), flush=True)
    return job


def export_merged(job: ExportJob, converter: Path | None, merged_only: bool,
                  prompts: list[Conversation]) -> dict | None:
    """The merged folder, the GGUF files, the Modelfile, then the report (None with --merged_only)."""
    merge(job.adapter_dir, job.base, job.merged_dir, job.dequantize)
    if merged_only:
        return None
    prompt_format = trained_prompt_format(job.adapter_dir, tokenizer_file_in(job.merged_dir))
    convert_f16(job.merged_dir, job.gguf("f16"), converter, prompt_format.chat_template(space_after_special=False))
    for t in job.gguf_types[1:]:
        quantize(job.gguf("f16"), job.gguf(t), t)
    atomic.write_text(job.folder / "Modelfile", modelfile(f"./{job.gguf(modelfile_target(job.gguf_types)).name}",
                                                          job.system_prompt, template=ollama_template(prompt_format)))
    files = check_gguf_files(job, prompt_format, prompts)
    return write_report(job, files, check_runtimes(job, prompt_format, prompts))  # whatever the verdict


def export_adapter(job: ExportJob, converter: Path, prompts: list[Conversation]) -> dict:
    """--lora_only: the PEFT adapter copied, adapter.gguf, its Modelfile, then (when asked) its check in llama.cpp."""
    copy_adapter(job.adapter_dir, job.folder / "adapter")
    convert_lora(job.adapter_dir, job.trained_on, job.adapter_gguf, converter)
    prompt_format = trained_prompt_format(job.adapter_dir, prompt_tokenizer(job.adapter_dir, job.trained_on))
    template = ollama_template(prompt_format)
    atomic.write_text(job.folder / "Modelfile", modelfile(job.ollama_base, job.system_prompt, ADAPTER_GGUF, template))
    # a base GGUF carries its own template (v0.2's gives other ids than training): llama-server takes this one instead
    gguf_template = prompt_format.chat_template(space_after_special=False)
    atomic.write_text(job.folder / LLAMA_CPP_TEMPLATE, gguf_template)
    if job.convert_base:
        convert_f16(base_checkout(job.base, "--convert_base"), job.base_gguf_file, converter, gguf_template)
    return write_report(job, [check_adapter(job, prompts)])


def write_card(job: ExportJob, report: dict | None, modelfile_from: str | None) -> None:
    """The export's model card (qlora/model_card.py), with the run's loss plot beside it; none where the export folder
    holds a README.md of the user's, which stays (carried over)."""
    theirs = job.export_dir / CARD
    if theirs.exists() and not is_model_card(theirs):
        print(f"note: {theirs} is not a model card of an export: kept as it is, without the export's card")
        return
    if (job.adapter_dir / PLOT).is_file():
        shutil.copyfile(job.adapter_dir / PLOT, job.folder / PLOT)
    commands = None
    if report is not None:  # the files named as the card's readers have them: beside it
        base = report["files"][0].get("base_gguf")
        beside = base is not None and Path(base).resolve().parent == job.export_dir.resolve()
        commands = run_commands(Path("."), job.adapter_dir, modelfile_from,
                                Path(base).name if beside else "BASE.gguf")
    atomic.write_text(job.folder / CARD, export_card(job.folder, job.adapter_dir, job.base, job.base_note, report,
                                                     commands))


# ---------------------------------------------------------------- before anything is written


def check_gpu(needed: bool) -> None:
    """Before anything is fetched: a merge that needs the GPU stops without one, naming an NVIDIA GPU that torch
    cannot use; an export that runs on the CPU only says so."""
    from .gpu import unusable_gpu
    from .device import cuda_available, note

    if cuda_available():
        return
    problem = unusable_gpu()
    if needed:
        raise ExportError(f"dequantizing a 4-bit base needs a CUDA GPU: {problem or 'this machine has none'}; or pass "
                          f"--base_model_16bit with its 16-bit original")
    if problem:
        note(problem, "the export runs on the CPU")


def check_disk_space(folder: Path, sizes: dict[str, int], margin: float = 1.1) -> None:
    """Fail before any work when the export's files would not fit beside the old export, which stays until the new one
    is complete (HF cache downloads not counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = int(sum(sizes.values()) * margin)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ExportError(f"{folder}: {needed / 2**30:.1f} GiB needed for {', '.join(sizes)} "
                          f"but only {free / 2**30:.1f} GiB free")


# ---------------------------------------------------------------- the transaction


@contextmanager
def staged(export_dir: Path):
    """A fresh staging folder beside `export_dir`, swapped in for it when the block ends without error (else removed):
    the export is all new or all old. The old folder's other files (the user's own, a base GGUF) are carried over into
    the new one first, by hard links; its export outputs are not (they belong to the old adapter)."""
    atomic.recover_dir(export_dir)
    atomic.remove_stale_temporaries(export_dir.parent, prefix=f".{export_dir.name}")
    with atomic.atomic_dir(export_dir) as staging:
        try:
            yield staging
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise ExportError(f"{err.filename or staging}: {err.strerror}; free some space (df -h {export_dir.parent}) "
                              f"and export again; the old export is as it was") from None
        carry_over(export_dir, staging)


def carry_over(old: Path, new: Path) -> None:
    if not old.is_dir():
        return
    for item in old.iterdir():
        ours = is_export_output(item.name)
        if ours or (new / item.name).exists() or ".tmp-" in item.name:
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name, copy_function=os.link, symlinks=True)
        else:
            os.link(item, new / item.name, follow_symlinks=False)


# ---------------------------------------------------------------- merge


def merge(adapter_dir: Path, base: str, target: Path, dequantize: bool = False) -> None:
    """Base + adapter merged in float16 safetensors shards, tensor by tensor (qlora/merge.py), with the tokenizer,
    config and generation config: the whole model is never in RAM. A 4-bit base without a known original is first
    dequantized on the GPU into a float16 copy beside `target`, removed after."""
    with atomic.atomic_dir(target) as tmp:
        try:
            if dequantize:
                source = target.with_name(f".{target.name}-base.tmp-{os.getpid()}")
                try:
                    merge_into(adapter_dir, dequantized_checkout(base, source), tmp)
                finally:
                    shutil.rmtree(source, ignore_errors=True)
            else:
                source = base_checkout(base, "base model")
                check_vocabulary(adapter_dir, base, source)
                merge_into(adapter_dir, source, tmp)
        except MergeError as err:
            raise ExportError(f"{err}; the old export is as it was") from None
        save_tokenizer(adapter_dir, base, tmp)


def check_vocabulary(adapter_dir: Path, base: str, base_dir: Path) -> None:
    """The base has as many token embeddings as the adapter's tokenizer has tokens: a base of another vocabulary (v1
    against v3 or Tekken) merges without an error into a model whose GGUF speaks another language."""
    tokenizer = prompt_tokenizer(adapter_dir, base)
    tokens = load_prompt_format(tokenizer).vocab_size
    embeddings = json.loads((base_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if embeddings not in (None, tokens):
        raise MergeError(f"{base_dir}: {embeddings} token embeddings, but the adapter was trained with {tokenizer} "
                         f"({tokens} tokens); pass --base_model_16bit with the base it was trained on")


def save_tokenizer(adapter_dir: Path, base: str, target: Path) -> None:
    """The adapter's tokenizer files (else the base's) plus the tokenizer file the prompts were rendered with, as it
    was: `tokenizer.model`, which transformers 5 does not write and without which llama.cpp's converter falls back on
    tokenizer.json and tokenizes unlike Mistral, or Tekken's `tokenizer.json`. Its chat template is ours, written for
    this tokenizer (`PromptFormat.chat_template`): the hub's Mistral templates give transformers and vLLM other ids
    than training (v0.2's joins each answer to `[/INST]` without SentencePiece's space, and refuses a system
    message)."""
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    with fetching(source, "base model", LOCAL_BASE):
        tokenizer = AutoTokenizer.from_pretrained(source)
    rendered_with = prompt_tokenizer(adapter_dir, base)
    prompt_format = trained_prompt_format(adapter_dir, rendered_with)
    tokenizer.chat_template = prompt_format.chat_template(runtimes.space_after_special(tokenizer, prompt_format))
    tokenizer.save_pretrained(target)
    shutil.copyfile(rendered_with, target / rendered_with.name)


def trained_prompt_format(adapter_dir: Path, tokenizer_file: Path) -> PromptFormat:
    """The renderer the adapter was trained with: its run's template (mistral unless config.yaml says otherwise)."""
    return load_prompt_format(tokenizer_file, trained_setting(adapter_dir, "template") or "mistral")


def prompt_tokenizer(adapter_dir: Path, base: str) -> Path:
    """The tokenizer file the adapter's training rendered with: the copy train_unsloth.py left beside it, else the
    base's."""
    return tokenizer_file_in(adapter_dir) or find_tokenizer_file(base, instead=LOCAL_BASE)


def copy_adapter(adapter_dir: Path, target: Path) -> None:
    with atomic.atomic_dir(target) as tmp:
        for f in adapter_dir.iterdir():
            if f.name in ADAPTER_FOLDER_FILES:
                shutil.copyfile(f, tmp / f.name)


# ---------------------------------------------------------------- checks


def check_gguf_files(job: ExportJob, prompt_format: PromptFormat, prompts: list[Conversation]) -> list[dict]:
    """Every GGUF of the job against the merged model (prompted as `prompt_format`, the merged folder's)."""
    checks = prompt_set(prompt_format, prompts)
    checked = check_all(job.merged_dir, {job.gguf(t).name: (job.gguf(t), None) for t in job.gguf_types}, checks)
    gguf_template = prompt_format.chat_template(space_after_special=False)
    return [check_file(job.gguf(t), t, checked[job.gguf(t).name], gguf_template, prompt_format.vocab.gguf_tokenizer)
            for t in job.gguf_types]


def check_runtimes(job: ExportJob, prompt_format: PromptFormat, prompts: list[Conversation]) -> list[dict]:
    """transformers on the merged folder, llama.cpp (llama-cpp-python's formatter and llama-server) on the smallest
    GGUF (they share one template), Ollama's template engine on the Modelfile: each one's ids against training's."""
    conversations = runtimes.CONVERSATIONS + prompts
    smallest = min((job.gguf(t) for t in job.gguf_types), key=lambda f: f.stat().st_size)
    template = ollama_template(prompt_format)
    return [runtimes.check_transformers(job.merged_dir, prompt_format, conversations),
            runtimes.check_llama_cpp_python(smallest, prompt_format, conversations),
            runtimes.check_llama_server(smallest, prompt_format, conversations),
            runtimes.check_ollama(template, job.system_prompt, smallest, prompt_format, conversations)]


def check_adapter(job: ExportJob, prompts: list[Conversation]) -> dict:
    """adapter.gguf on the base GGUF in llama.cpp against the merged model (streamed to a folder in the staging folder
    for the check, removed after): on an f16 (or f32) base it must match as an f16 file does; on a quantized base it
    is reported. Unchecked without a base GGUF."""
    from gguf import LlamaFileType

    entry = {"file": ADAPTER_GGUF, "type": f"lora {LORA_OUTTYPE}", "bytes": job.adapter_gguf.stat().st_size}
    if job.base_gguf is None:
        return entry | {"not_checked": "no base GGUF to apply it to (--base_gguf PATH or --convert_base)",
                        "problems": []}
    reference = job.folder / ".reference"
    merge(job.adapter_dir, job.base, reference, job.dequantize)
    try:
        checks = prompt_set(load_prompt_format(prompt_tokenizer(job.adapter_dir, job.base)), prompts)
        what = f"{ADAPTER_GGUF} on {job.base_gguf.name}"
        checked = check_all(reference, {what: (job.base_gguf_file, job.adapter_gguf)}, checks)[what]
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    entry |= {"base_gguf": str(job.base_gguf)} | checked
    if "metadata" in entry:
        entry["metadata"].pop("chat_template")  # the base's own: Ollama uses the Modelfile's TEMPLATE
        file_type = entry["metadata"]["file_type"]
        entry["base_type"] = LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
        entry["strict"] = entry["base_type"] in STRICT_BASE_TYPES
        entry["problems"] += mismatches(entry)
    return entry
