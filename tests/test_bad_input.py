"""What bad input gets (README): through the real scripts on the tiny model, each case ends with a non-zero exit and
one `error:` line, no traceback, and whatever the user had is still there."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, one_line_error, run_script

# A finished run in seconds: two steps, no evaluation
QUICK = ["--config", "configs/smoke.yaml", "--max_steps", "2", "--save_steps", "1", "--eval_fraction", "0"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes: what "nothing was lost" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(fixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script("train_unsloth.py", *QUICK, "--output_dir", str(out))
    return out


@pytest.fixture
def run_with_notes(finished_run, tmp_path) -> Path:
    """A copy of the finished run with a file of the user's in it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("my notes on this run\n")
    return run


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("flag,value,says", [
    ("--num_train_epochs", "0", "'num_train_epochs' must be above 0"),
    ("--learning_rate", "0", "'learning_rate' must be above 0"),
    ("--learning_rate", "-0.001", "'learning_rate' must be above 0"),
    ("--lora_r", "0", "'lora_r' must be at least 1"),
    ("--eval_fraction", "1", "'eval_fraction' must be at least 0 and below 1"),
    ("--optim", "adam", "'optim' must be auto or an optimizer of transformers"),
])
def test_a_setting_out_of_range_is_refused_before_anything_is_made(fixture_dir, tmp_path, flag, value, says):
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", flag, value, "--output_dir", str(out),
                        check=False)
    one_line_error(result, f"{flag}: {says}")
    assert not out.exists()


def test_lora_target_modules_the_model_lacks_are_refused_listing_its_modules(fixture_dir, tmp_path):
    result = run_script("train_unsloth.py", *QUICK, "--lora_target_modules", "q_proj", "qkv_proj",
                        "--output_dir", str(tmp_path / "run"), check=False)
    one_line_error(result, "--lora_target_modules: fixtures/tiny-mistral has no module qkv_proj",
                   "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


# ---------------------------------------------------------------- --overwrite_output_dir


@pytest.mark.parametrize("bad,says", [
    (["--learning_rate", "-1"], "'learning_rate' must be above 0"),  # refused by the settings' check
    (["--token_budget", "8"], "--token_budget 8 is smaller than the longest training row"),  # once data is prepared
    (["--lora_target_modules", "qkv_proj"], "has no module qkv_proj"),  # once the model is loaded
])
def test_overwrite_with_a_bad_setting_keeps_the_old_run_and_the_users_file(run_with_notes, bad, says):
    before = snapshot(run_with_notes)
    result = run_script("train_unsloth.py", *QUICK, *bad, "--output_dir", str(run_with_notes),
                        "--overwrite_output_dir", check=False)
    one_line_error(result, says)
    assert snapshot(run_with_notes) == before


def test_overwrite_replaces_the_runs_own_files_and_nothing_else(run_with_notes):
    (run_with_notes / "checkpoint-7").mkdir()  # an older run's checkpoint that the new one will not write
    run_script("train_unsloth.py", *QUICK, "--max_steps", "1", "--output_dir", str(run_with_notes),
               "--overwrite_output_dir")
    assert (run_with_notes / "notes.txt").read_text() == "my notes on this run\n"
    assert sorted(p.name for p in run_with_notes.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((run_with_notes / "metrics.json").read_text())["global_step"] == 1


# ---------------------------------------------------------------- a prepared data folder as --dataset


@pytest.fixture(scope="module")
def prepared(fixture_dir, sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    run_script("data_prep.py", "--config", "configs/smoke.yaml", "--system_prompt", "Be brief.", "--eval_fraction", "0",
               "--output_dir", str(out))
    return out


@pytest.mark.parametrize("flag,value,was", [("--max_seq_length", "64", "max_seq_length: 256"),
                                            ("--template", "instruction", "template: 'mistral'"),
                                            ("--system_prompt", "Be verbose.", "system_prompt: 'Be brief.'")])
def test_a_data_setting_a_prepared_folder_cannot_honour_is_refused(prepared, tmp_path, flag, value, was):
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", *QUICK, "--dataset", str(prepared), flag, value, "--output_dir", str(out),
                        check=False)
    one_line_error(result, f"{prepared} was prepared with {was}", f"leave out {flag}", "prepare it again")
    assert not (out / "config.yaml").exists()


def test_a_prepared_folders_data_settings_are_recorded_as_the_runs(prepared, tmp_path):
    """config.yaml (which infer.py and the export read for the prompt) says what the rows were made with."""
    import yaml

    out = tmp_path / "run"
    run_script("train_unsloth.py", *QUICK, "--max_steps", "1", "--dataset", str(prepared), "--output_dir", str(out))
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["system_prompt"], recorded["dataset"]) == ("Be brief.", str(prepared))


def test_a_presets_data_setting_is_named_as_the_presets_not_as_a_flag(prepared, tmp_path):
    """configs/smoke.yaml's eval_fraction (0.1) against the folder's (0): the line names the preset, not a flag the
    user never passed, and says to prepare with it."""
    result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--max_steps", "1", "--dataset",
                        str(prepared), "--output_dir", str(tmp_path / "run"), check=False)
    one_line_error(result, f"{prepared} was prepared with eval_fraction: 0.0",
                   "configs/smoke.yaml sets eval_fraction: 0.1: leave eval_fraction out of it",
                   "prepare it again with data_prep.py --config configs/smoke.yaml")
    assert "--eval_fraction" not in result.stderr


def test_the_printed_and_saved_config_is_the_resolved_one(prepared, tmp_path):
    """backend auto, load_in_4bit and token_budget auto (the defaults) on this CPU machine: printed and saved as what
    ran, the CPU backend, full-precision weights and the planned micro-batch."""
    import yaml

    out = tmp_path / "run"
    result = run_script("train_unsloth.py", "--model_name", str(ROOT / "fixtures" / "tiny-mistral"), "--dataset",
                        str(prepared), "--max_steps", "1", "--output_dir", str(out))
    shown = result.stdout.split("resolved config:\n", 1)[1]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["backend"], recorded["load_in_4bit"]) == ("cpu", False) and isinstance(recorded["token_budget"], int)
    for name in ("backend", "load_in_4bit", "token_budget", "max_seq_length", "system_prompt"):
        assert f"\n  {name}: {recorded[name]}\n" in "\n" + shown, name


def test_a_truncated_arrow_file_in_a_prepared_folder_is_one_line(prepared, tmp_path):
    damaged = tmp_path / "data"
    shutil.copytree(prepared, damaged)
    arrow = next(damaged.glob("train/*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    result = run_script("train_unsloth.py", *QUICK, "--dataset", str(damaged), "--output_dir", str(tmp_path / "run"),
                        check=False)
    one_line_error(result, f"{damaged}: damaged prepared data", "prepare it again with data_prep.py")


# ---------------------------------------------------------------- output folders and --config


def test_an_output_folder_that_is_a_file_is_one_line(fixture_dir, sample_data, finished_run, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's\n")
    below = taken / "sub"
    for result, what in [
        (run_script("data_prep.py", "--config", "configs/smoke.yaml", "--output_dir", str(taken), check=False),
         f"{taken}: exists and is not a data_prep output"),
        (run_script("data_prep.py", "--config", "configs/smoke.yaml", "--output_dir", str(below), check=False),
         f"{taken}: is a file, not a folder"),
        (run_script("train_unsloth.py", *QUICK, "--output_dir", str(taken), check=False),
         f"{taken}: is a file, not a folder"),
        (run_script("train_unsloth.py", *QUICK, "--output_dir", str(below), check=False),
         f"{taken}: is a file, not a folder"),
        (run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(taken), "--merged_only",
                    check=False), f"{taken}: is a file, not a folder"),
        (run_script("infer.py", str(finished_run), "--input", str(sample_data), "--output", str(below / "a.jsonl"),
                    check=False), f"{taken}: is a file, not a folder"),
        (run_script("infer.py", str(finished_run), "--input", str(sample_data), "--output", str(tmp_path),
                    check=False), f"--output {tmp_path}: is a folder; give a file name"),
    ]:
        one_line_error(result, what)
    assert taken.read_text() == "a file of the user's\n"


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_a_config_that_is_a_folder_or_a_binary_file_is_one_line(tiny_model, kind):
    config = tiny_model if kind == "folder" else tiny_model / "model.safetensors"
    says = "is a folder; --config takes a YAML file" if kind == "folder" else "not a YAML file"
    one_line_error(run_script("data_prep.py", "--config", str(config), check=False), f"{config}: {says}")


# ---------------------------------------------------------------- adapters and merged weights


def damaged_adapter(finished_run: Path, folder: Path, how: str) -> Path:
    shutil.copytree(finished_run, folder, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    weights = folder / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    else:
        tensors = load_file(weights)
        name = sorted(tensors)[0]
        tensors[name][0, 0] = float(how)
        save_file(tensors, weights)
    return folder


@pytest.mark.parametrize("how,says", [("truncated", "not a whole safetensors file"), ("nan", "holds NaN or inf"),
                                      ("inf", "holds NaN or inf")])
@pytest.mark.parametrize("script", ["infer.py", "export_gguf.py"])
def test_a_damaged_or_diverged_adapter_is_refused_in_one_line(finished_run, tmp_path, script, how, says):
    adapter = damaged_adapter(finished_run, tmp_path / "adapter", how)
    args = [str(adapter), "--prompt", "hi"] if script == "infer.py" else ["--adapter_dir", str(adapter),
                                                                          "--merged_only"]
    one_line_error(run_script(script, *args, check=False), f"{adapter / 'adapter_model.safetensors'}", says)
    assert not (adapter / "export").exists()


def test_merged_weights_holding_inf_are_refused_by_infer(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "merged")
    shutil.copyfile(tiny_model / "tokenizer.model", tmp_path / "merged" / "tokenizer.model")
    result = run_script("infer.py", str(tmp_path / "merged"), "--prompt", "hi", check=False)
    one_line_error(result, f"{tmp_path / 'merged'}: weight model.layers.1.mlp.down_proj.weight holds NaN or inf")


# ---------------------------------------------------------------- smaller gaps


def test_an_inst_inside_a_llama2_answer_stays_in_the_answer(tiny_model, prompt_format, tmp_path):
    from qlora.chat import IGNORE
    from qlora.data import load_prepared

    rows = tmp_path / "rows.jsonl"
    answer = "Write [INST] where the user's turn starts."
    rows.write_text(json.dumps({"text": f"<s>[INST] How is a turn marked? [/INST] {answer} </s>"}) + "\n")
    run_script("data_prep.py", "--dataset", str(rows), "--model_name", str(tiny_model), "--eval_fraction", "0",
               "--output_dir", str(tmp_path / "data"))
    row = load_prepared(tmp_path / "data")["train"][0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert prompt_format.decode(trained) == answer


def test_infer_input_with_a_byte_order_mark_is_read_as_data_prep_reads_it(finished_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Count from 3 to 5"}).encode() + b"\n")
    answers = tmp_path / "answers.jsonl"
    run_script("infer.py", str(finished_run), "--input", str(prompts), "--output", str(answers), "--max_new_tokens",
               "4")
    assert json.loads(answers.read_text())["prompt"] == "Count from 3 to 5"


def test_file_system_failures_name_the_path_and_what_to_do():
    """The cases this machine's tests cannot make (they run as root, on a disk with room), as the scripts word them."""
    import errno

    from qlora.errors import describe

    assert describe(PermissionError(errno.EACCES, "Permission denied", "/srv/out")) == \
        "/srv/out: Permission denied; choose a folder you can write to, or change its permissions"
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/srv/out/x")).endswith(
        "the disk is full: free some space or choose a folder on another disk")
    missing = "adapter: no adapter_model.safetensors"
    assert describe(FileNotFoundError(missing)) == missing


def test_a_missing_package_is_one_line_naming_it_the_python_and_the_install(fixture_dir, tmp_path):
    """data_prep.py run by a Python that lacks `datasets` (blocked in sys.modules, as import finds it absent)."""
    start = ("import runpy, sys; sys.modules['datasets'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", start, "data_prep.py", "--config", "configs/smoke.yaml",
                             "--output_dir", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    one_line_error(result, "'datasets' is not installed for", sys.executable, "bash scripts/setup.sh")
    assert not (tmp_path / "data").exists()


def test_llama_cpp_missing_points_to_its_install_script():
    from importlib.metadata import PackageNotFoundError

    from qlora.errors import missing_package

    for err in (ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp"),
                PackageNotFoundError("llama-cpp-python")):
        assert missing_package(err).endswith("run `sh scripts/install_llama_cpp.sh`"), missing_package(err)
