"""The model cards and --push_to_hub. The smoke run's README.md and its export's parse as Hugging Face model cards,
name the base model in their front matter, and carry the figures of metrics.json, stats.json, config.yaml and
export_report.json as those files hold them; the samples of metrics.json appear first and last step side by side, and
nothing is said of samples without them; a README.md of the user's is kept. --push_to_hub without a hub (HF_HUB_OFFLINE=1,
an endpoint that refuses connections) ends in one `error:` line and a non-zero exit after every local file is written
and whole; with a hub, what goes up is the adapter and its card, or the export's files and its card, private by
default (the hub's API stubbed: no network here).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, one_line_error, run_script
from qlora import model_card, push
from qlora.export_report import file_verdict

TYPES = ["f16", "q8_0"]
REPO = "someone/smoke-card"
OFFLINE = {"HF_HUB_OFFLINE": "1"}
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: the connection is refused at once


def card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def no_temporaries(folder: Path) -> None:
    """Nothing half-written left: every file was renamed into place when complete."""
    left = [p.name for p in folder.parent.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


@pytest.fixture(scope="module")
def exported(trained_adapter, tmp_path_factory):
    """The smoke run exported by export_gguf.py with --push_to_hub and HF_HUB_OFFLINE=1: the export is written, the
    push fails."""
    folder = tmp_path_factory.mktemp("card-export") / "export"
    result = run_script("export_gguf.py", "--adapter_dir", str(trained_adapter), "--export_dir", str(folder),
                        "--gguf_types", *TYPES, "--push_to_hub", REPO, check=False, env=OFFLINE)
    return folder, result


# ---------------------------------------------------------------- the run's card


def test_the_run_card_is_a_model_card_naming_the_base(trained_adapter):
    adapter = json.loads((trained_adapter / "adapter_config.json").read_text())
    data = card(trained_adapter).data
    assert data.base_model == adapter["base_model_name_or_path"] == "fixtures/tiny-mistral"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"lora", "sft", "trl", model_card.TAG} <= set(data.tags)
    assert data.datasets is None  # trained on a local file: no hub data set to name
    assert model_card.is_model_card(trained_adapter / "README.md")
    assert "Model Card for Model ID" not in (trained_adapter / "README.md").read_text()  # PEFT's card is gone


def test_the_run_cards_figures_are_the_runs(trained_adapter):
    text = card(trained_adapter).text
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    stats = json.loads((trained_adapter / "data" / "stats.json").read_text())
    settings = yaml.safe_load((trained_adapter / "config.yaml").read_text())
    first, last = metrics["eval_loss"][0], metrics["eval_loss"][-1]
    assert row("before training", 0, f"{first['loss']:.4g}") in text
    assert row("after training", metrics["global_step"], f"{last['loss']:.4g}") in text
    assert row("optimizer steps", metrics["global_step"]) in text
    assert row("real tokens/s", f"{metrics['real_tokens_per_second']:.0f}") in text
    assert row("real tokens/s after the first step",
               f"{metrics['throughput_after_warmup']['real_tokens_per_second']:.0f}") in text
    assert row("real tokens trained on", metrics["real_tokens_seen"]) in text
    assert f"| training time | {metrics['wall_time_s']:.0f} s" in text
    assert row("padding share", f"{metrics['padding_share']:.1%}") in text
    assert row("train / eval rows", f"{stats['train_rows']} / {stats['eval_rows']}") in text
    assert row("rows read / kept", f"{stats['rows_in']} / {stats['kept']}") in text
    for name in ("lora_r", "lora_alpha", "learning_rate", "max_seq_length", "num_train_epochs", "seed"):
        assert row(name, settings[name]) in text, name
    manifest = json.loads((trained_adapter / "manifest.json").read_text())
    assert row("device", manifest["device"]) in text and f"- PEFT {manifest['versions']['peft']}" in text
    assert "](loss.png)" in text and (trained_adapter / "loss.png").is_file()
    if metrics.get("samples"):  # taken where the run has samples (qlora/samples.py)
        assert "## Samples" in text and f"| step {metrics['samples'][0]['step']} |" in text
    else:
        assert "## Samples" not in text and "Greedy answers" not in text


def run_copy(run: Path, folder: Path, metrics: dict) -> Path:
    """The run's small files in `folder`, with `metrics` as its metrics.json."""
    folder.mkdir()
    for name in ("adapter_config.json", "config.yaml", "manifest.json", "loss.png"):
        shutil.copyfile(run / name, folder / name)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_samples_appear_first_and_last_step_side_by_side(trained_adapter, tmp_path):
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    answers = lambda *said: [{"prompt": "Capital of Veloria?", "answer": said[0], "reference": "Quillon"},
                             {"prompt": "Count | from 3", "answer": said[1], "reference": "3 4 5\n6"}]
    metrics["samples"] = [{"step": 0, "answers": answers("ok ok ok", "<s> zzz")},
                          {"step": 50, "answers": answers("Quill", "3 4")},
                          {"step": 368, "answers": answers("Quillon", "3 4 5\n6")}]
    text = model_card.run_card(run_copy(trained_adapter, tmp_path / "run", metrics))
    assert "| prompt | step 0 | step 368 | reference |" in text and "step 50" not in text
    assert row("Capital of Veloria?", "ok ok ok", "Quillon", "Quillon") in text
    assert row("Count \\| from 3", "&lt;s&gt; zzz", "3 4 5<br>6", "3 4 5<br>6") in text  # one cell, one line each

    metrics["samples"] = []
    assert "## Samples" not in model_card.run_card(run_copy(trained_adapter, tmp_path / "none", metrics))


def test_a_card_says_only_what_the_files_hold(trained_adapter, tmp_path):
    """A bare adapter (no metrics.json, config.yaml, manifest.json, data): a card of what is there, nothing more."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copyfile(trained_adapter / "adapter_config.json", folder / "adapter_config.json")
    assert model_card.write_run_card(folder)
    assert card(folder).data.base_model == "fixtures/tiny-mistral"
    text = card(folder).text
    assert "## Results" not in text and "## Training" not in text and "## Samples" not in text


# ---------------------------------------------------------------- the export's card


def test_the_export_card_is_a_model_card_with_each_file_and_its_check(exported, trained_adapter):
    folder, _ = exported
    report = json.loads((folder / "export_report.json").read_text())
    loaded = card(folder)
    assert loaded.data.base_model == report["base"] == "fixtures/tiny-mistral"
    assert loaded.data.base_model_relation == "finetune" and loaded.data.pipeline_tag == "text-generation"
    assert {"gguf", "llama.cpp", "ollama", model_card.TAG} <= set(loaded.data.tags)
    assert model_card.is_model_card(folder / "README.md")
    text = loaded.text
    assert [f["file"] for f in report["files"]] == [f"model-{t}.gguf" for t in TYPES]
    for entry in report["files"]:
        assert row(entry["file"], entry["type"], f"{entry['bytes'] / 2**20:.1f}", file_verdict(entry)) in text
    assert "llama-cli -m model-q8_0.gguf -cnv --jinja" in text  # the Modelfile's file, named as beside the card
    assert f"ollama create {trained_adapter.name} -f Modelfile && ollama run {trained_adapter.name}" in text
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    last = metrics["eval_loss"][-1]
    assert row("after training", last["step"], f"{last['loss']:.4g}") in text
    assert (folder / "loss.png").read_bytes() == (trained_adapter / "loss.png").read_bytes()


def test_the_adapter_exports_card(trained_adapter, tmp_path):
    """--lora_only, unchecked: adapter.gguf with its verdict, the commands on a base GGUF of the reader's own and the
    Ollama versions that take ADAPTER."""
    from qlora.export_report import OLD_OLLAMA

    folder = tmp_path / "export"
    run_script("export_gguf.py", "--adapter_dir", str(trained_adapter), "--export_dir", str(folder), "--lora_only",
               "--ollama_base", "tiny-mistral:f16")
    report = json.loads((folder / "export_report.json").read_text())
    loaded = card(folder)
    assert loaded.data.base_model == "fixtures/tiny-mistral" and loaded.data.base_model_relation == "adapter"
    entry = report["files"][0]
    assert row("adapter.gguf", entry["type"], f"{entry['bytes'] / 2**20:.1f}", file_verdict(entry)) in loaded.text
    assert "not checked" in file_verdict(entry) and "| adapter/ | PEFT |" in loaded.text
    assert "llama-cli -m BASE.gguf --lora adapter.gguf -cnv --jinja --chat-template-file chat_template.jinja" in (
        loaded.text)
    assert f"Ollama ({OLD_OLLAMA}):" in loaded.text


def test_an_export_keeps_a_readme_of_the_users(trained_adapter, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("# My notes on this export\n")
    for _ in range(2):  # the first export into the folder, then a re-export over it
        result = run_script("export_gguf.py", "--adapter_dir", str(trained_adapter), "--export_dir", str(folder),
                            "--merged_only")
        assert "is not a model card of an export: kept as it is" in result.stdout
        assert (folder / "README.md").read_text() == "# My notes on this export\n"
    assert (folder / "merged" / "model.safetensors").is_file()


# ---------------------------------------------------------------- --push_to_hub without a hub


def test_an_export_pushed_offline_fails_in_one_line_with_every_file_written(exported):
    from gguf import GGUFReader
    from safetensors import safe_open

    folder, result = exported
    one_line_error(result, REPO, "HF_HUB_OFFLINE is set", str(folder), f"python -m qlora.push {folder} {REPO}")
    assert "done: the export is in" in result.stdout  # the export's last words came first
    for gguf_type in TYPES:
        assert GGUFReader(folder / f"model-{gguf_type}.gguf").tensors
    with safe_open(folder / "merged" / "model.safetensors", "pt") as merged:
        assert list(merged.keys())
    json.loads((folder / "export_report.json").read_text())
    assert (folder / "Modelfile").is_file() and card(folder).data.base_model
    no_temporaries(folder)


def test_a_run_pushed_to_an_unreachable_hub_fails_in_one_line_with_every_file_written(fixture_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--max_steps", "2", "--eval_steps", "1",
                        "--output_dir", str(out), "--push_to_hub", REPO, "--hub_private", "false", check=False,
                        env=UNREACHABLE)
    one_line_error(result, REPO, "the hub cannot be reached", f"python -m qlora.push {out} {REPO} --hub_private false")
    with safe_open(out / "adapter_model.safetensors", "pt") as adapter:
        assert list(adapter.keys())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert card(out).data.base_model == "fixtures/tiny-mistral"
    assert row("after training", 2, f"{metrics['eval_loss'][-1]['loss']:.4g}") in card(out).text
    no_temporaries(out)


@pytest.mark.parametrize("env, says", [(OFFLINE, "HF_HUB_OFFLINE is set"), (UNREACHABLE, "cannot be reached")])
def test_pushing_later_without_a_hub_fails_in_one_line_and_changes_nothing(trained_adapter, exported, env, says):
    import os

    for folder in (trained_adapter, exported[0]):
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
        result = subprocess.run([sys.executable, "-m", "qlora.push", str(folder), REPO], cwd=ROOT, text=True,
                                capture_output=True, env={**os.environ, **env}, timeout=120)
        one_line_error(result, REPO, says)
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_pushing_needs_a_token_and_names_a_refusal(trained_adapter, monkeypatch):
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from qlora.hub import HubError

    monkeypatch.setattr(push, "hub_unreachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubError, match=f"not pushed to {REPO}: no Hugging Face token here; log in"):
        push.push_run(trained_adapter, REPO)

    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_token")
    for status, says in [(401, "does not take the token"), (403, "cannot write there"), (500, "answered 500")]:
        def refuse(self, *args, status=status, **kwargs):
            answer = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError(f"{status} Client Error", response=answer)

        monkeypatch.setattr(HfApi, "create_repo", refuse)
        with pytest.raises(HubError, match=says):
            push.push_run(trained_adapter, REPO)


def test_what_goes_up(trained_adapter, exported, monkeypatch):
    """The adapter, its tokenizer, card and reports (not the checkpoints, the data or the export); the export's files
    and card (not llama.cpp's log); into a private repository unless asked otherwise."""
    from huggingface_hub import HfApi, RepoUrl, constants
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    monkeypatch.setattr(push, "hub_unreachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_token")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(kw) or RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw))

    def uploaded(folder: Path) -> set[str]:
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        return set(filter_repo_objects(files, allow_patterns=calls[-1]["allow_patterns"]))

    push.push_run(trained_adapter, REPO)
    assert calls[0] == {"private": True, "exist_ok": True}
    assert uploaded(trained_adapter) >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model",
                                         "README.md", "loss.png", "metrics.json", "config.yaml", "manifest.json"}
    assert not any("/" in name for name in uploaded(trained_adapter))  # no checkpoint, data or export

    folder = exported[0]
    push.push_export(folder, REPO, private=False)
    assert calls[2] == {"private": False, "exist_ok": True}
    went = uploaded(folder)
    assert {"README.md", "loss.png", "Modelfile", "export_report.json", "merged/model.safetensors",
            *(f"model-{t}.gguf" for t in TYPES)} <= went and "llama.cpp.log" not in went
