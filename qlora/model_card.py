"""The model card (README.md) of a run folder and of an export folder, in the Hugging Face format: YAML front matter
(base_model, library_name, tags, datasets where the data came from the hub, pipeline_tag: PEFT's and TRL's
conventions) over what was trained and how. Every figure in it comes from the run's own files: config.yaml (the
resolved settings), metrics.json (losses, steps, time, tokens/s, the samples taken), manifest.json (the device and
versions), the prepared data's stats.json and, in the export folder, export_report.json (each file and its check).
What none of them holds is left out, never guessed: an adapter folder without a run's files gets a card of what is
there.

A README.md of the user's in either folder is kept, and no card written (`is_model_card` tells the toolkit's cards,
and PEFT's, from anything else).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .config import ConfigError, saved_settings
from .data import PREPARED_MARK, READERS, dropped_line
from .export_job import BASE_GGUF, LLAMA_CPP_TEMPLATE
from .export_report import OLD_OLLAMA, file_verdict, runtime_lines

CARD = "README.md"
PLOT = "loss.png"  # qlora/report.py's plot; the export copies it beside its card
TOOLKIT = "qlora-mistral"
TAG = TOOLKIT  # in the tags of every card the toolkit writes: tells them from a README.md of the user's
PREFERENCE_SETTINGS = ("init_adapter", "beta")  # shown for DPO and ORPO runs only
# The resolved settings a card lists (config.yaml holds them all), in this order
SETTINGS = ("method", *PREFERENCE_SETTINGS, "model_name", "template", "system_prompt", "train_on_prompt",
            "max_seq_length", "packing", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "num_train_epochs",
            "max_steps", "token_budget", "tokens_per_step", "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "seed")
VERSIONS = {"peft": "PEFT", "trl": "TRL", "transformers": "Transformers", "torch": "PyTorch", "datasets": "Datasets",
            "accelerate": "Accelerate", "bitsandbytes": "bitsandbytes", "unsloth": "Unsloth"}


def is_model_card(path: Path) -> bool:
    """A card the toolkit wrote (its tag in the front matter) or PEFT's (save_pretrained's README.md, naming the
    library in its front matter); any other README.md is the user's."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    front = text.split("\n---", 1)[0].splitlines()
    return text.startswith("---") and ("library_name: peft" in front or f"- {TAG}" in front)


# ---------------------------------------------------------------- the run's files


@dataclass
class Run:
    """What a run folder holds about its run; None (or empty) for each file it lacks."""

    folder: Path
    settings: dict  # config.yaml
    adapter: dict  # adapter_config.json
    metrics: dict | None
    manifest: dict | None
    data: dict | None  # the prepared data's stats.json

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def base(self) -> str | None:
        return self.adapter.get("base_model_name_or_path") or self.settings.get("model_name")

    @property
    def dataset(self) -> str | None:
        """The data trained on as the user named it (a prepared folder's stats name its raw source)."""
        return (self.data or {}).get("source") or self.settings.get("dataset")


def read_run(folder: Path) -> Run:
    try:
        settings = saved_settings(folder / "config.yaml") or {}
    except ConfigError:  # not the settings of a run: the card goes without them
        settings = {}
    return Run(folder, settings, read_json(folder / "adapter_config.json") or {}, read_json(folder / "metrics.json"),
               read_json(folder / "manifest.json"), data_report(folder, settings))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def data_report(folder: Path, settings: dict) -> dict | None:
    """stats.json of the data the run read: a data_prep folder given as --dataset, else the one the run prepared."""
    places = ([Path(settings["dataset"])] if settings.get("dataset") else []) + [folder / "data"]
    return next((read_json(place / PREPARED_MARK) for place in places if (place / PREPARED_MARK).is_file()), None)


def on_hub(name: str | None) -> bool:
    """Whether `name` reads as a hub id (namespace/name) rather than a path or a data file: what the front matter may
    name (the hub refuses a card whose base_model is not a model id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")) or Path(name).suffix.lower() in READERS:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def named(name: str, kind: str = "") -> str:
    """A model or data set in the text: a link to its hub page where it is a hub id and no local folder."""
    if on_hub(name) and not Path(name).exists():
        return f"[{name}](https://huggingface.co/{kind}{name})"
    return f"`{name}`"


# ---------------------------------------------------------------- the cards


def run_card(folder: Path) -> str:
    """The card of a run folder: the adapter, and how it was trained."""
    run = read_run(folder)
    base, four_bit = run.base, run.settings.get("load_in_4bit")
    tags = ([f"base_model:adapter:{base}"] if on_hub(base) else []) + ["lora"] + (["qlora"] if four_bit else [])
    tags += ["sft", "trl", "transformers"] + (["unsloth"] if run.settings.get("backend") == "unsloth" else []) + [TAG]
    front = front_matter(run, base, tags, library_name="peft")
    method = "QLoRA (the base loaded in 4 bits)" if four_bit else "LoRA (the base not quantized)"
    intro = [f"# {run.name}", "",
             f"A LoRA adapter{' for ' + named(base) if base else ''}, trained with {method} by {TOOLKIT}'s "
             f"`train_unsloth.py` (TRL's SFTTrainer){' on ' + named(run.dataset, 'datasets/') if run.dataset else ''}."
             f" Every figure below comes from the run's own files (config.yaml, metrics.json, manifest.json, the "
             f"prepared data's stats.json).", ""]
    use = ["## Use", "", f"With {TOOLKIT}, on this folder:", "", "```sh",
           f"python infer.py {run.name} --chat                  # the adapter on its base",
           f"python export_gguf.py --adapter_dir {run.name}     # merged, as GGUF files for llama.cpp and Ollama",
           "```", "", "With PEFT (this folder, or the repository's id):", "", "```python",
           "from peft import AutoPeftModelForCausalLM", "",
           f'model = AutoPeftModelForCausalLM.from_pretrained("{run.name}")', "```"]
    return card_text(front, intro + results(run) + samples(run) + training(run) + use)


def export_card(folder: Path, adapter_dir: Path, base: str, base_note: str, report: dict | None,
                commands: dict[str, str] | None) -> str:
    """The card of an export folder: each file with its check's verdict, how to run them, and the run's story (from
    the training folder `adapter_dir`). `report` is export_report.json (None with --merged_only, which checks
    nothing); `commands` the export's commands for llama.cpp and Ollama, naming the files beside the card."""
    run = read_run(adapter_dir)
    ggufs = [f for f in (report or {}).get("files", []) if f["file"].endswith(".gguf")]
    adapter_route = (folder / "adapter").is_dir()
    tags = (["gguf", "llama.cpp", "ollama"] if ggufs else []) + (["lora"] if adapter_route else []) + ["sft", TAG]
    front = front_matter(run, base, tags, library_name=None if ggufs else "transformers",
                         base_model_relation="adapter" if adapter_route else "finetune")
    what = ("the adapter as GGUF (adapter.gguf), for llama.cpp and Ollama to put on a base they have" if adapter_route
            else "the merged 16-bit model and its GGUF files, for llama.cpp and Ollama" if ggufs
            else "the merged 16-bit model (safetensors)")
    intro = [f"# {run.name}", "",
             f"The run `{run.name}`'s LoRA adapter, exported by {TOOLKIT}'s `export_gguf.py`: {what}. "
             f"{base_note[:1].upper()}{base_note[1:]}.", ""]
    return card_text(front, intro + files(folder, report) + run_it(commands, adapter_route) + results(run) +
                     samples(run) + training(run))


def front_matter(run: Run, base: str | None, tags: list[str], **fields):
    from huggingface_hub import ModelCardData

    dataset = run.dataset
    return ModelCardData(base_model=base if on_hub(base) else None, datasets=[dataset] if on_hub(dataset) else None,
                         model_name=run.name, pipeline_tag="text-generation", tags=tags,
                         **{k: v for k, v in fields.items() if v is not None})


def card_text(front, lines: list[str]) -> str:
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_run_card(folder: Path) -> bool:
    """The run's card as README.md, once its reports are written; False where a README.md of the user's is there (it
    stays)."""
    card = folder / CARD
    if card.exists() and not is_model_card(card):
        return False
    atomic.write_text(card, run_card(folder))
    return True


# ---------------------------------------------------------------- the sections


def cell(value) -> str:
    """A value as one cell of a Markdown table: its lines joined by <br>, | and HTML escaped."""
    text = html.escape("none" if value is None else str(value), quote=False).replace("|", "\\|")
    return "<br>".join(text.splitlines()) or " "


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""])


def results(run: Run) -> list[str]:
    """Eval loss before and after, the last train loss, the loss plot (linear and log scale)."""
    m = run.metrics
    if m is None:
        return []
    lines = ["## Results", ""]
    evals, trains = m.get("eval_loss") or [], m.get("train_loss") or []
    if evals:
        first, last = evals[0], evals[-1]
        rows = [["before training" if first["step"] == 0 else "first evaluation", first["step"], f"{first['loss']:.4g}"]]
        if len(evals) > 1:
            rows.append(["after training" if last["step"] == m["global_step"] else "last evaluation", last["step"],
                         f"{last['loss']:.4g}"])
        lines += [f"Loss on the {eval_rows(run)}held-out eval split:", ""] + table(["", "step", "eval loss"], rows)
    else:
        lines += ["No eval split: no eval loss.", ""]
    if trains:
        lines += [f"Train loss (logged every {run.settings.get('logging_steps', '?')} steps): "
                  f"{trains[0]['loss']:.4g} at step {trains[0]['step']}, {trains[-1]['loss']:.4g} at step "
                  f"{trains[-1]['step']}.", ""]
    lines += rewards(m)
    if (run.folder / PLOT).is_file():
        lines += [f"![Train and eval loss by step, on a linear and on a log scale]({PLOT})", ""]
    return lines


def rewards(m: dict) -> list[str]:
    """A preference run's implicit reward on the eval pairs, chosen over rejected, at the first and last evaluation."""
    logged = m.get("rewards") or {}
    margins, accuracies = logged.get("eval_rewards/margins"), logged.get("eval_rewards/accuracies")
    if not (margins and accuracies):
        return []
    rows = [[point["step"], f"{point['value']:.4g}", f"{accuracy['value']:.2%}"]
            for point, accuracy in ((margins[0], accuracies[0]), (margins[-1], accuracies[-1]))]
    return ["Implicit reward of the chosen over the rejected answer on the eval pairs (margin: mean difference; "
            "accuracy: share of pairs where the chosen is ahead):", ""] + table(["step", "margin", "accuracy"], rows)


def eval_rows(run: Run) -> str:
    if not run.data:
        return ""
    return f"{run.data['eval_rows']} {'pairs' if run.data.get('kind') == 'preference' else 'rows'} of the "


def samples(run: Run) -> list[str]:
    """The samples taken during training, at the first and the last step side by side (none: nothing said)."""
    taken = (run.metrics or {}).get("samples") or []
    if not taken:
        return []
    shown = [taken[0]] + ([taken[-1]] if len(taken) > 1 else [])
    references = any(a.get("reference") is not None for a in taken[0]["answers"])
    header = ["prompt"] + [f"step {entry['step']}" for entry in shown] + (["reference"] if references else [])
    rows = []
    for i, asked in enumerate(taken[0]["answers"]):
        answers = [entry["answers"][i]["answer"] if i < len(entry["answers"]) else "" for entry in shown]
        rows.append([asked["prompt"], *answers] + ([asked.get("reference") or ""] if references else []))
    when = "at the start of training and at its end" if len(shown) > 1 else f"at step {shown[0]['step']}"
    return ["## Samples", "", f"Greedy answers to held-out prompts {when} (all of them, by step, in metrics.json):",
            ""] + table(header, rows)


def training(run: Run) -> list[str]:
    """The data and its report, the resolved settings, the device, time and speed, the versions."""
    lines = ["## Training", ""]
    if run.data:
        lines += ["### Data", "", f"Prepared by {TOOLKIT}'s data_prep (its stats.json):", ""] + table(
            ["", ""], data_rows(run.data))
    shown = [name for name in SETTINGS if name in run.settings
             and (name not in PREFERENCE_SETTINGS or run.settings.get("method", "sft") != "sft")]
    chosen = [[name, setting(run.settings[name])] for name in shown]
    if chosen:
        lines += ["### Settings", "", "As resolved for the run (config.yaml holds every one):", ""]
        lines += table(["setting", "value"], chosen)
    lines += speed(run) + versions(run)
    return lines if len(lines) > 2 else []


def data_rows(d: dict) -> list[list]:
    """The data report's lines: of instruction rows, or of preference pairs (their prompts and answers)."""
    dropped = dropped_line(d)
    rows = [["source", d["source"]], ["format", d["format"]], ["tokenizer", d["tokenizer"]]]
    if d.get("kind") == "preference":
        spread = {key: f"{d[key]['p50']} / {d[key]['p90']} / {d[key]['max']}"
                  for key in ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
        return rows + [["rows read / pairs kept", f"{d['rows_in']} / {d['kept']}"], ["dropped", dropped],
                       ["answers cut", d["truncated"]], ["train / eval pairs", f"{d['train_rows']} / {d['eval_rows']}"],
                       ["prompt tokens (p50 / p90 / max)", spread["prompt_tokens"]],
                       ["chosen answer tokens (p50 / p90 / max)", spread["chosen_tokens"]],
                       ["rejected answer tokens (p50 / p90 / max)", spread["rejected_tokens"]]]
    return rows + [["rows read / kept", f"{d['rows_in']} / {d['kept']}"], ["dropped", dropped],
                   ["truncated", d["truncated"]], ["train / eval rows", f"{d['train_rows']} / {d['eval_rows']}"],
                   ["tokens a row (p50 / p90 / max)", f"{d['length_p50']} / {d['length_p90']} / {d['length_max']}"],
                   ["share of tokens trained on", d["trained_token_share"]]]


def setting(value) -> str | None:
    return ", ".join(map(str, value)) if isinstance(value, list) else None if value is None else str(value)


def speed(run: Run) -> list[str]:
    m, manifest = run.metrics, run.manifest or {}
    rows = [["device", manifest["device"]]] if "device" in manifest else []
    backend = manifest.get("backend") or run.settings.get("backend")
    rows += [["backend", backend]] if backend else []
    if m:
        rows += [["optimizer steps", m["global_step"]], ["training time", duration(m["wall_time_s"])],
                 ["real tokens trained on", m["real_tokens_seen"]],
                 ["real tokens/s", f"{m['real_tokens_per_second']:.0f}"]]
        after = m.get("throughput_after_warmup") or {}
        if after:
            rows += [["real tokens/s after the first step", f"{after['real_tokens_per_second']:.0f}"],
                     ["seconds a step after the first", f"{after['seconds_per_step']:.3f}"]]
        rows.append(["padding share", f"{m['padding_share']:.1%}"])
        if m.get("peak_gpu_memory_gib") is not None:
            rows.append(["peak GPU memory", f"{m['peak_gpu_memory_gib']:.1f} GiB"])
        if m.get("plan"):
            rows.append(["plan", m["plan"]["summary"]])
    if not rows:
        return []
    return ["### Hardware, time and speed", "", "Real tokens are those not padding (metrics.json):", ""] + table(
        ["", ""], rows)


def duration(seconds: float) -> str:
    """`540 s (9.0 min)`, `7210 s (2.00 h)`."""
    longer = f" ({seconds / 3600:.2f} h)" if seconds >= 3600 else f" ({seconds / 60:.1f} min)" if seconds >= 60 else ""
    return f"{seconds:.0f} s{longer}"


def versions(run: Run) -> list[str]:
    manifest = run.manifest
    if not manifest:
        return []
    found = [f"- {label} {manifest['versions'][name]}" for name, label in VERSIONS.items()
             if manifest.get("versions", {}).get(name)]
    found.append(f"- Python {manifest['python']}")
    if manifest.get("git_commit"):
        found.append(f"- {TOOLKIT} commit {manifest['git_commit']}")
    return ["### Framework versions", "", *found, ""]


def files(folder: Path, report: dict | None) -> list[str]:
    """Each file of the export with its check's verdict (export_report.json), and the runtimes' checks."""
    rows = [[entry["file"], entry["type"], f"{entry['bytes'] / 2**20:.1f}", file_verdict(entry)]
            for entry in (report or {}).get("files", [])]
    if (folder / "merged").is_dir():
        rows.append(["merged/", "f16 safetensors", "", "the reference the GGUF files are checked against; for "
                     "transformers" if rows else "not checked (--merged_only); for transformers"])
    if (folder / "adapter").is_dir():
        rows.append(["adapter/", "PEFT", "", "the adapter as trained, for PEFT"])
        if (folder / LLAMA_CPP_TEMPLATE).is_file():
            rows.append([LLAMA_CPP_TEMPLATE, "", "", "the training prompt's template, for llama.cpp's "
                         "--chat-template-file (a base GGUF carries its own)"])
        if (folder / BASE_GGUF).is_file():
            rows.append([BASE_GGUF, "f16", f"{(folder / BASE_GGUF).stat().st_size / 2**20:.1f}",
                         "the base converted (--convert_base), the one adapter.gguf is checked on"])
    if (folder / "Modelfile").is_file():
        rows.append(["Modelfile", "", "", "for Ollama"])
    if report:
        rows.append(["export_report.json", "", "", "every check's figures"])
    lines = ["## Files", ""] + table(["file", "type", "MiB", "check"], rows)
    if report and report.get("runtimes"):
        said = runtime_lines(report).splitlines()
        lines += [said[0][0].upper() + said[0][1:], ""] + [f"- {line.strip()}" for line in said[1:]] + [""]
    return lines


def run_it(commands: dict[str, str] | None, adapter_route: bool) -> list[str]:
    """How to run the files in llama.cpp and in Ollama: the commands the export ends with."""
    if not commands:
        return []
    lines = ["## Run it", "", "In the folder of these files:", ""]
    for runtime in ("llama.cpp", "Ollama"):
        also = f" ({OLD_OLLAMA})" if runtime == "Ollama" and adapter_route else ""
        lines += [f"{runtime}{also}:", "", "```sh", commands[runtime], "```", ""]
    return lines
