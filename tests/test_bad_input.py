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
    assert describe(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device; the disk is full: free some space or choose a folder on another disk"
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


# ---------------------------------------------------------------- artifacts that do not belong together


@pytest.mark.parametrize("model", ["tiny_v3", "tiny_tekken"])
def test_a_prepared_folder_of_another_vocabulary_is_refused_before_anything_is_written(prepared, tmp_path, model,
                                                                                         request):
    other = request.getfixturevalue(model)
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", *QUICK, "--dataset", str(prepared), "--model_name", str(other),
                        "--output_dir", str(out), check=False)
    one_line_error(result, f"{prepared} was prepared with the v1 (32000 tokens) tokenizer", "prepare the data again",
                   f"--model_name {other}")
    assert not out.exists()


@pytest.fixture
def interrupted_run(finished_run, tmp_path) -> Path:
    """The finished run as a run killed after its last checkpoint leaves it: no adapter, no metrics."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
        (run / name).unlink()
    return run


@pytest.mark.parametrize("flag,value,was", [("--lora_r", "8", "lora_r: 64 (given: 8)"),
                                            ("--learning_rate", "0.01", "learning_rate: 0.003 (given: 0.01)"),
                                            ("--max_seq_length", "128", "max_seq_length: 256 (given: 128)")])
def test_resume_with_a_setting_the_checkpoint_fixes_is_refused_and_the_run_kept(interrupted_run, flag, value, was):
    before = snapshot(interrupted_run)
    for how in (["--resume"], ["--resume_from_checkpoint", str(interrupted_run / "checkpoint-1")]):
        result = run_script("train_unsloth.py", "--config", str(interrupted_run / "config.yaml"), "--output_dir",
                            str(interrupted_run), *how, flag, value, check=False)
        one_line_error(result, "was trained with", was, f"leave out {flag}",
                       f"resume with --config {interrupted_run / 'config.yaml'}")
        assert snapshot(interrupted_run) == before  # config.yaml above all: the README's resume command still works


@pytest.fixture
def reshaped_base(tiny_model, tmp_path) -> Path:
    """The tiny model's vocabulary with a wider MLP: a base the tiny adapter was not trained on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.intermediate_size *= 2
    folder = tmp_path / "wider"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copyfile(tiny_model / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_a_16bit_base_of_another_shape_or_vocabulary_is_refused_before_the_merge(finished_run, reshaped_base,
                                                                                  tiny_v3, tmp_path):
    for base, says in [(reshaped_base, f"is [256, 512] but {reshaped_base} has [256, 1024]"),
                       (tiny_v3, f"{tiny_v3}: 32768 token embeddings, but the adapter was trained with")]:
        export = tmp_path / "export"
        result = run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(export),
                            "--base_model_16bit", str(base), "--merged_only", check=False)
        line = one_line_error(result, says, "--base_model_16bit")
        assert not export.exists() or not any(export.iterdir()), line


# ---------------------------------------------------------------- files the user had


def test_a_users_readme_in_the_output_folder_stays(run_with_notes):
    readme = run_with_notes / "README.md"
    readme.write_text("# My experiments\n")
    run_script("train_unsloth.py", *QUICK, "--max_steps", "1", "--output_dir", str(run_with_notes),
               "--overwrite_output_dir")
    assert readme.read_text() == "# My experiments\n"
    assert (run_with_notes / "adapter_config.json").is_file()


def test_a_preset_in_the_output_folder_is_not_replaced(fixture_dir, tmp_path):
    preset = tmp_path / "config.yaml"
    shutil.copyfile(ROOT / "configs/smoke.yaml", preset)
    before = snapshot(tmp_path)
    result = run_script("train_unsloth.py", "--config", str(preset), "--output_dir", str(tmp_path), check=False)
    one_line_error(result, f"{preset}: not the settings of a run", "choose another --output_dir")
    assert snapshot(tmp_path) == before and not (tmp_path / "data").exists()


def test_files_of_the_users_that_a_run_would_replace_are_refused(fixture_dir, tmp_path):
    """A folder no run wrote to, holding files of the names a run writes (here metrics.json and a data/ folder of the
    user's own): one line naming them, before anything is written."""
    (tmp_path / "metrics.json").write_text('{"mine": 1}\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.jsonl").write_text('{"q": "a", "a": "b"}\n')
    before = snapshot(tmp_path)
    result = run_script("train_unsloth.py", *QUICK, "--output_dir", str(tmp_path), check=False)
    one_line_error(result, f"{tmp_path}: holds metrics.json, data, which no run wrote", "choose another --output_dir")
    assert snapshot(tmp_path) == before


def test_files_of_the_users_that_an_export_would_replace_are_refused(finished_run, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Modelfile").write_text("FROM my-own-model\n")
    before = snapshot(folder)
    result = run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(folder),
                        "--merged_only", check=False)
    one_line_error(result, f"--export_dir {folder}: holds Modelfile, which no export wrote", "choose another folder")
    assert snapshot(folder) == before


@pytest.mark.parametrize("script,flag", [("train_unsloth.py", "--output_dir"), ("data_prep.py", "--output_dir"),
                                         ("export_gguf.py", "--export_dir"), ("export_gguf.py", "--adapter_dir")])
def test_an_empty_path_is_refused_before_anything_is_written(fixture_dir, script, flag):
    before = sorted(p.name for p in ROOT.iterdir())
    result = run_script(script, "--config", "configs/smoke.yaml", flag, "", check=False)
    one_line_error(result, f"{flag}: '{flag[2:]}' must be a path, not empty")
    assert sorted(p.name for p in ROOT.iterdir()) == before


def test_an_export_into_the_training_folder_or_above_it_is_refused(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    before = snapshot(tmp_path)
    for export_dir, says in [(run, "holds the adapter"), (tmp_path, "holds the adapter")]:
        result = run_script("export_gguf.py", "--adapter_dir", str(run), "--export_dir", str(export_dir),
                            "--merged_only", check=False)
        one_line_error(result, f"--export_dir {export_dir}: {says}", "choose a folder of its own")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    result = run_script("export_gguf.py", "--adapter_dir", str(run), "--export_dir", str(other), "--merged_only",
                        check=False)
    one_line_error(result, f"--export_dir {other}: holds a training run or an adapter")
    assert snapshot(run) == {k.removeprefix("run/"): v for k, v in before.items() if k.startswith("run/")}


def test_a_reexport_after_an_export_killed_between_its_renames_keeps_the_users_files(finished_run, tmp_path):
    """The old export moved aside under a dead pid, the new one not yet in place: the next export's own checks make
    an empty export folder first, which must not make the old one (with the user's file in it) count as stale."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = tmp_path / f".export.old-{dead.pid}"
    old.mkdir()
    (old / "notes.txt").write_text("mine\n")
    (tmp_path / f".export.tmp-{dead.pid}").mkdir()
    run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(tmp_path / "export"),
               "--merged_only")
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "export" / "merged").is_dir()
    assert not list(tmp_path.glob(".export.*-*"))


# ---------------------------------------------------------------- faults


def test_text_that_cannot_be_encoded_is_named_with_its_file_and_line(tiny_model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Name a colour", "completion": "Blue"}) + "\n" +
                    '{"prompt": "Name a fruit", "completion": "Pear \\ud800"}\n')
    out = tmp_path / "data"
    result = run_script("data_prep.py", "--dataset", str(rows), "--model_name", str(tiny_model), "--output_dir",
                        str(out), check=False)
    one_line_error(result, f"{rows}:2: the assistant text's character 6 ('\\ud800') is a lone surrogate")
    assert not out.exists()


def test_a_prompt_that_is_not_text_is_one_line_and_a_chat_goes_on(finished_run):
    result = run_script("infer.py", str(finished_run), "--prompt", "Count from 3 to 5 \udcff", check=False)
    one_line_error(result, "--prompt: character 19 ('\\udcff') is a lone surrogate")
    chat = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(finished_run), "--chat", "--temperature", "0",
                           "--max_new_tokens", "4"], input=b"Count from 3 to 5\nbad \xff byte\nCount from 3 to 5\n",
                          cwd=ROOT, capture_output=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert b"this line: character 5 ('\\udcff') is a lone surrogate" in chat.stderr
    assert b"Traceback" not in chat.stderr
    assert chat.stdout.count(b"\n") == 2, chat.stdout  # both good turns answered (a line each), the bad one dropped


def test_report_to_an_integration_that_is_not_installed_is_one_line_before_the_model_loads(fixture_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", *QUICK, "--report_to", "wandb", "--output_dir", str(out), check=False)
    one_line_error(result, "--report_to wandb: wandb is not installed for", "pip install wandb",
                   "--report_to none")
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_infer_seed_out_of_range_is_one_line(finished_run, seed):
    result = run_script("infer.py", str(finished_run), "--prompt", "hi", "--seed", seed, check=False)
    one_line_error(result, f"--seed must be from 0 to 2**32 - 1, got {seed}")


# ---------------------------------------------------------------- values in generated files, options ignored


def test_a_modelfile_value_with_a_newline_is_refused(finished_run, tmp_path):
    result = run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(tmp_path / "e"),
                        "--lora_only", "--ollama_base", "mistral\nSYSTEM evil", check=False)
    one_line_error(result, "--ollama_base: 'ollama_base' must be one line of printable text")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("only", ["--lora_only", "--merged_only"])
def test_gguf_types_with_an_export_that_writes_none_is_refused(finished_run, tmp_path, only):
    result = run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(tmp_path / "e"),
                        only, "--gguf_types", "q4_k_m", check=False)
    one_line_error(result, "--gguf_types are the merged model's GGUF files", "drop one of them")
    assert not (tmp_path / "e").exists()


def test_a_base_for_a_check_that_does_not_run_is_refused(finished_run, tmp_path):
    result = run_script("export_gguf.py", "--adapter_dir", str(finished_run), "--export_dir", str(tmp_path / "e"),
                        "--lora_only", "--ollama_base", "tiny", "--base_model_16bit", "fixtures/tiny-mistral",
                        check=False)
    one_line_error(result, "--base_model_16bit with --lora_only is the reference", "add --base_gguf or --convert_base")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a tmpfs of that size, a disk that fills up (unmounted after the test); skipped where mounting is
    not allowed (not root)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


# what the smoke run's checkpoint writes first: the adapter (2.1 MB), the tokenizer (3.4 MB), the optimizer (4.1 MB)
@pytest.mark.parametrize("size", ["4m", "7m"], ids=["full at the tokenizer", "full at torch.save"])
def test_a_full_disk_while_a_checkpoint_is_saved_is_one_line_naming_it(prepared, small_disk, size):
    out = small_disk(size) / "run"
    result = run_script("train_unsloth.py", *QUICK, "--dataset", str(prepared), "--output_dir", str(out), check=False)
    one_line_error(result, f"{out / '.checkpoint-staging' / 'checkpoint-1'}", "No space left on device",
                   "checkpoint-1 is not saved", f"--config {out / 'config.yaml'} --resume",
                   "the disk is full: free some space")


def test_a_full_disk_during_gguf_conversion_is_one_line_naming_the_file(tiny_model, small_disk, capfd):
    from qlora import export, export_job, gguf_convert

    folder = small_disk("1m") / "export"
    with pytest.raises(export_job.ExportError) as caught:
        with export.staged(folder) as staging:
            gguf_convert.convert_f16(tiny_model, staging / "model-f16.gguf", gguf_convert.find_converter(),
                                     "{{ bos_token }}")
    assert str(caught.value).startswith(f"{folder.parent}/.export.tmp-"), caught.value
    assert "model-f16.gguf: No space left on device; free some space" in str(caught.value)
    assert "Traceback" not in capfd.readouterr().err  # the converter's own, held back
    assert not list(folder.parent.iterdir())  # nothing half-written stays


def test_a_setting_that_is_not_text_is_refused_as_the_flags_are_read(fixture_dir, tmp_path):
    out = tmp_path / "data"
    result = run_script("data_prep.py", "--config", "configs/smoke.yaml", "--system_prompt", "Be brief \udcff",
                        "--output_dir", str(out), check=False)
    one_line_error(result, "--system_prompt: 'system_prompt' holds text that is not valid UTF-8 ('Be brief \\udcff')")
    assert not out.exists()


def test_a_full_disk_while_data_is_prepared_is_one_line_and_leaves_nothing(fixture_dir, small_disk):
    disk = small_disk("64k")
    result = run_script("data_prep.py", "--config", "configs/smoke.yaml", "--output_dir", str(disk / "data"),
                        check=False)
    one_line_error(result, f"{disk / 'data'}: No space left on device; the disk is full: free some space")
    assert not list(disk.iterdir())
