"""The four scripts as a new user meets them: --help, and one-line errors for a model or data set that cannot be had."""

import ast
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, one_line_error, run_script
from qlora import hub

SCRIPTS = ["data_prep.py", "train_unsloth.py", "infer.py", "export_gguf.py"]


def usage_examples(script: str) -> list[str]:
    """The indented command lines of the script's docstring, which --help shows as its description."""
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False)
    return [line for line in doc.splitlines() if line.startswith("    ") and line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_keeps_the_examples_lines(script):
    result = run_script(script, "--help", timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "Traceback" not in result.stderr
    shown = result.stdout.splitlines()
    examples = usage_examples(script)
    assert examples, f"{script}'s docstring should show how to run it"
    for line in examples:  # each example on its own line, as written (argparse's default would refill them)
        assert line in shown, line


# ---------------------------------------------------------------- a model or data set that cannot be had

MADE_UP = "qlora-mistral-tests/no-such-model"
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # the hub as a machine without network sees it, at once instead of after retries


# No connection: the hub's address made a closed port on this machine (refused at once, then retried for ~25 s)
NO_CONNECTION = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.mark.parametrize("env,fix", [(OFFLINE, "HF_HUB_OFFLINE is set"), (NO_CONNECTION, "check the connection")],
                         ids=["offline mode", "no connection"])
def test_data_prep_without_model_name_offline_names_the_default_model(sample_data, tmp_path, env, fix):
    """The first thing a new user runs, on a machine that cannot reach the hub."""
    result = run_script("data_prep.py", "--dataset", str(sample_data), "--output_dir", str(tmp_path / "d"),
                        check=False, timeout=300, env=env)
    one_line_error(result, "model unsloth/mistral-7b-instruct-v0.2-bnb-4bit is not in the local Hugging Face cache",
                   fix, "--model_name PATH")
    assert "Retry" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "d").exists()


def test_unknown_hub_data_set_offline_is_one_line(tiny_model, tmp_path):
    result = run_script("data_prep.py", "--dataset", "qlora-mistral-tests/no-such-data", "--model_name",
                        str(tiny_model), "--output_dir", str(tmp_path / "d"), check=False, timeout=120, env=OFFLINE)
    one_line_error(result, "data set qlora-mistral-tests/no-such-data", "not in the local Hugging Face cache", "--dataset PATH")


def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(sample_data, tmp_path):
    result = run_script("data_prep.py", "--dataset", str(sample_data), "--model_name", str(tmp_path / "my model"),
                        "--output_dir", str(tmp_path / "d"), check=False, timeout=120, env=OFFLINE)
    one_line_error(result, str(tmp_path / "my model"), "neither an existing folder nor a hub id")


def test_train_with_an_unknown_model_offline_is_one_line(fixture_dir, tmp_path):
    result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--model_name", MADE_UP,
                        "--output_dir", str(tmp_path / "run"), check=False, timeout=300, env=OFFLINE)
    one_line_error(result, f"model {MADE_UP}", "--model_name PATH")


@pytest.mark.parametrize("script", ["train_unsloth.py", "data_prep.py"])
def test_a_missing_model_with_no_connection_is_one_line_without_retries(script, sample_data, tmp_path):
    """Without HF_HUB_OFFLINE, on a machine that cannot reach the hub: huggingface_hub would try the model's files six
    times over about 23 s (`Retrying in 1s [Retry 1/5]`, ...); the hub is found unreachable first, then the cache is
    all there is."""
    result = run_script(script, "--dataset", str(sample_data), "--model_name", MADE_UP, "--output_dir",
                        str(tmp_path / "out"), check=False, timeout=300, env=NO_CONNECTION)
    one_line_error(result, f"model {MADE_UP} is not in the local Hugging Face cache",
                   "the hub cannot be reached: check the connection", "--model_name PATH")
    assert "Retry" not in result.stdout + result.stderr, result.stderr[-2000:]


def test_export_with_an_unknown_base_offline_is_one_line(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": MADE_UP}))
    save_file({"w": torch.zeros(1)}, adapter / "adapter_model.safetensors")  # a whole file: the base fails first
    result = run_script("export_gguf.py", "--adapter_dir", str(adapter), "--gguf_types", "f16", check=False,
                        timeout=300, env=OFFLINE)
    one_line_error(result, f"base model {MADE_UP}", "--base_model_16bit PATH")


def test_infer_with_an_adapter_on_an_unknown_base_offline_is_one_line(tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": MADE_UP}))
    save_file({"w": torch.zeros(1)}, adapter / "adapter_model.safetensors")  # a whole file: the base fails first
    shutil.copyfile(tiny_model / "tokenizer.model", adapter / "tokenizer.model")
    result = run_script("infer.py", str(adapter), "--prompt", "hi", check=False, timeout=300, env=OFFLINE)
    one_line_error(result, f"base model {MADE_UP}", "base_model_name_or_path", "adapter_config.json")


@pytest.mark.parametrize("script,flag", [("infer.py", None), ("export_gguf.py", "--adapter_dir")])
def test_a_pickled_adapter_is_refused_in_one_line(script, flag, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": MADE_UP}))
    (adapter / "adapter_model.bin").write_bytes(b"not loaded")
    args = [flag, str(adapter)] if flag else [str(adapter), "--prompt", "hi"]
    result = run_script(script, *args, check=False, timeout=300, env=OFFLINE)
    one_line_error(result, "no adapter_model.safetensors", "safe_serialization=True")


@pytest.mark.parametrize("reason,parts", [
    ("gated", ["is gated", "accept its terms on https://huggingface.co/datasets/org/data", "hf auth login"]),
    ("missing", ["is not on the Hugging Face Hub", "check the id", "hf auth login"]),
])
def test_gated_and_unknown_repositories_say_what_to_do(reason, parts):
    """The two answers only a reachable hub gives (this machine has none): the wording, naming id and fix."""
    text = hub.message("org/data", "data set", reason, "pass --dataset PATH to a local file", kind="dataset")
    assert text.startswith("data set org/data ") and text.endswith("or pass --dataset PATH to a local file")
    assert "\n" not in text and all(part in text for part in parts)


def test_the_libraries_errors_are_told_apart_through_their_causes():
    """transformers and datasets wrap the hub's errors in their own; the cause decides, not the wrapper."""
    import httpx
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/api/models/org/model"))

    def wrapped(cause, outer):
        try:
            try:
                raise cause
            except Exception as err:
                raise outer from err
        except Exception as err:
            return err

    assert hub.why(wrapped(GatedRepoError("gated", response=response), OSError("transformers' words"))) == "gated"
    assert hub.why(wrapped(RepositoryNotFoundError("no", response=response), DatasetNotFoundError("no"))) == "missing"
    assert hub.why(wrapped(LocalEntryNotFoundError("not cached"), OSError("We couldn't connect"))) == "offline"
    assert hub.why(OSError("disk full")) is None and hub.why(ValueError("bad")) is None


def test_commands_to_copy_name_the_python_that_ran():
    """The resume hint and the export's `run it:` lines name this Python: `python` where that is it on PATH (an
    activated virtualenv), else its path, relative below the working folder (`.venv/bin/python`)."""
    import os
    import subprocess
    import sys

    code = "from qlora.errors import interpreter; print(interpreter())"

    def named(path: str) -> str:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PATH": path}).stdout.strip()

    relative = os.path.relpath(sys.executable, ROOT)
    assert named("/usr/bin:/bin") == (relative if not relative.startswith("..") else sys.executable)
    if os.path.basename(sys.executable) == "python":
        assert named(f"{os.path.dirname(sys.executable)}:/usr/bin:/bin") == "python"
