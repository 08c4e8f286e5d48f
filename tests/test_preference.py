"""Preference tuning on the CPU path: the real TRL DPOTrainer and ORPOTrainer on the tiny model with the real tokenizer,
on the sample pairs (fixtures/sample_pairs.jsonl: a right answer chosen, a wrong one rejected)."""

import json
import shutil
import signal

import pytest

from bench import standins
from conftest import load_adapter, one_line_error, run_script, start_script, wait_for
from qlora import fixtures

# the smoke recipe on pairs, evaluated on the held-out ones every 10 steps
PAIRS = ["--config", "configs/smoke.yaml", "--eval_steps", "10", "--save_steps", "100", "--logging_steps", "5",
         "--sample_count", "0"]


@pytest.fixture(scope="module")
def sft_run(fixture_dir, tmp_path_factory):
    """A short SFT run of the smoke recipe: the adapter DPO goes on from."""
    out = tmp_path_factory.mktemp("sft") / "run"
    run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--max_steps", "40", "--sample_count", "0",
               "--output_dir", str(out))
    return out


@pytest.fixture(scope="module")
def pairs(fixture_dir, tmp_path_factory):
    """The sample pairs prepared by data_prep.py with the smoke recipe's data settings (a tenth of them held out)."""
    out = tmp_path_factory.mktemp("pairs") / "prepared"
    run_script("data_prep.py", "--config", "configs/smoke.yaml", "--dataset", str(fixture_dir / fixtures.SAMPLE_PAIRS),
               "--output_dir", str(out))
    return out


@pytest.fixture(scope="module")
def swapped_pairs(pairs, tmp_path_factory):
    """The same prepared pairs with chosen and rejected swapped in the training split only: the held-out pairs stay
    as they are, so what a run learned shows on them the other way round."""
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(pairs))
    train = data["train"].rename_columns({"chosen_ids": "rejected_ids", "rejected_ids": "chosen_ids"})
    out = tmp_path_factory.mktemp("swapped") / "prepared"
    DatasetDict({"train": train, "eval": data["eval"]}).save_to_disk(str(out))
    for name in ("stats.json", "config.yaml"):
        shutil.copyfile(pairs / name, out / name)
    return out


def held_out(run) -> tuple[list[float], list[float]]:
    """The implicit reward margins and accuracies on the held-out pairs, by evaluation."""
    rewards = json.loads((run / "metrics.json").read_text())["rewards"]
    return ([p["value"] for p in rewards["eval_rewards/margins"]],
            [p["value"] for p in rewards["eval_rewards/accuracies"]])


def test_dpo_after_sft_prefers_the_chosen_answers_of_pairs_it_did_not_train_on(sft_run, pairs, swapped_pairs,
                                                                                 tmp_path):
    runs = {}
    for name, data in (("right", pairs), ("swapped", swapped_pairs)):
        runs[name] = tmp_path / name
        run_script("train_unsloth.py", *PAIRS, "--method", "dpo", "--init_adapter", str(sft_run), "--dataset",
                   str(data), "--max_steps", "20", "--learning_rate", "1e-3", "--output_dir", str(runs[name]))
    margins, accuracies = held_out(runs["right"])
    # the reference is the SFT adapter itself: before the first step the policy is the reference
    assert abs(margins[0]) < 1e-6, margins
    assert margins[-1] > 0.5 and accuracies[-1] >= 0.8, (margins, accuracies)
    margins, accuracies = held_out(runs["swapped"])
    assert margins[-1] < -0.5 and accuracies[-1] <= 0.2, (margins, accuracies)
    # the run went on from the SFT adapter (its shape, r 64, is the run's), and saved only the trained adapter
    settings = (runs["right"] / "config.yaml").read_text()
    assert f"init_adapter: {sft_run}" in settings and "lora_r: 64" in settings
    assert not (runs["right"] / "ref").exists()


def test_orpo_from_the_base_prefers_the_chosen_answers_of_pairs_it_did_not_train_on(pairs, swapped_pairs, tmp_path):
    runs = {}
    for name, data in (("right", pairs), ("swapped", swapped_pairs)):
        runs[name] = tmp_path / name
        run_script("train_unsloth.py", *PAIRS, "--method", "orpo", "--dataset", str(data), "--max_steps", "30",
                   "--learning_rate", "3e-3", "--output_dir", str(runs[name]))
    (start, *_, right), accuracies = held_out(runs["right"])
    assert right > start and accuracies[-1] >= 0.7, (start, right, accuracies)
    (start, *_, swapped), accuracies = held_out(runs["swapped"])
    assert swapped < start and accuracies[-1] <= 0.3, (start, swapped, accuracies)


def test_dpo_killed_then_resumed_trains_the_adapter_an_uninterrupted_run_does(sft_run, pairs, tmp_path):
    args = [*PAIRS, "--method", "dpo", "--init_adapter", str(sft_run), "--dataset", str(pairs), "--max_steps", "12",
            "--save_steps", "4", "--logging_steps", "1", "--eval_steps", "100", "--token_budget", "512"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("train_unsloth.py", *args, "--output_dir", str(straight))
    process = start_script("train_unsloth.py", *args, "--output_dir", str(killed), log=tmp_path / "killed.log")
    wait_for(killed / "checkpoint-4", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter_config.json").exists(), "the run ended before the kill"

    assert not list(killed.glob("checkpoint-*/ref")), "a checkpoint holds the reference adapter"
    resumed = run_script("train_unsloth.py", "--config", str(killed / "config.yaml"), "--resume")
    assert "resuming from" in resumed.stdout
    a, b = load_adapter(straight), load_adapter(killed)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed adapter differs by {worst}"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (straight, killed)]
    assert [p["step"] for p in metrics[1]["train_loss"]] == list(range(1, 13))
    assert metrics[1]["rewards"]["rewards/margins"] == metrics[0]["rewards"]["rewards/margins"]


def test_a_dpo_adapter_exports_and_answers_like_an_sft_one(sft_run, pairs, tmp_path):
    """Everything after training is the same for a preference run: the merged folder, the GGUF, infer.py on both."""
    run = tmp_path / "dpo"
    run_script("train_unsloth.py", *PAIRS, "--method", "dpo", "--init_adapter", str(sft_run), "--dataset",
               str(pairs), "--max_steps", "4", "--output_dir", str(run))
    export = tmp_path / "export"
    run_script("export_gguf.py", "--adapter_dir", str(run), "--export_dir", str(export), "--gguf_types", "f16")
    assert (export / "merged" / "model.safetensors").is_file() and (export / "model-f16.gguf").is_file()
    assert "FROM ./model-f16.gguf" in (export / "Modelfile").read_text()
    answers = [run_script("infer.py", str(source), "--prompt", "What is the capital of Arvenia?", "--temperature",
                          "0", "--max_new_tokens", "8").stdout for source in (run, export / "model-f16.gguf")]
    assert answers[0].strip() and answers[0] == answers[1], answers


# ---------------------------------------------------------------- bad input: one line each, nothing written


def test_pairs_given_to_sft_and_rows_given_to_dpo_are_refused_before_anything_is_written(fixture_dir, pairs,
                                                                                         tmp_path):
    cases = [(["--dataset", str(fixture_dir / fixtures.SAMPLE_PAIRS)], "--method dpo or --method orpo"),
             (["--dataset", str(pairs)], "--method dpo or --method orpo"),
             (["--dataset", str(fixture_dir / fixtures.SAMPLE_DATA), "--method", "dpo"], "not preference pairs"),
             (["--dataset", str(fixture_dir / fixtures.SAMPLE_DATA), "--method", "orpo"], "not preference pairs")]
    for args, says in cases:
        out = tmp_path / "run"
        result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", *args, "--output_dir", str(out),
                            check=False)
        one_line_error(result, says)
        assert not out.exists(), args


def test_an_init_adapter_of_another_base_or_for_sft_is_refused_before_anything_is_written(tiny_v3, fixture_dir,
                                                                                        sft_run, tmp_path):
    other = standins.save_random_adapter(tiny_v3, tmp_path / "v3-adapter")
    out = tmp_path / "run"
    dpo = ["--config", "configs/smoke.yaml", "--method", "dpo", "--dataset", str(fixture_dir / fixtures.SAMPLE_PAIRS),
           "--output_dir", str(out)]
    for args, says in [(["--init_adapter", str(other)], f"was trained on {tiny_v3}, not on --model_name"),
                       (["--init_adapter", str(tmp_path)], "holds no finished adapter"),
                       (["--init_adapter", str(out)], "no such folder"),
                       (["--init_adapter", str(sft_run), "--method", "sft", "--dataset",
                         str(fixture_dir / fixtures.SAMPLE_DATA)], "--init_adapter is for --method dpo or orpo")]:
        one_line_error(run_script("train_unsloth.py", *dpo, *args, check=False), says)
        assert not out.exists(), args


def test_settings_of_instruction_rows_are_refused_with_pairs(fixture_dir, tmp_path):
    out = tmp_path / "run"
    pairs_file = str(fixture_dir / fixtures.SAMPLE_PAIRS)
    for args, says in [(["--method", "dpo", "--packing"], "--packing is for instruction rows"),
                       (["--method", "orpo", "--train_on_prompt"], "--train_on_prompt is for instruction rows")]:
        result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--dataset", pairs_file, *args,
                            "--output_dir", str(out), check=False)
        one_line_error(result, says)
        assert not out.exists(), args


def test_an_init_adapter_of_a_4bit_repository_fits_its_16bit_original_and_a_folder_however_written(tiny_model):
    from qlora.init_adapter import same_model

    assert same_model("unsloth/mistral-7b-instruct-v0.2-bnb-4bit", "mistralai/Mistral-7B-Instruct-v0.2")
    assert same_model(str(tiny_model), f"{tiny_model}/../{tiny_model.name}")
    assert not same_model("unsloth/mistral-7b-instruct-v0.2-bnb-4bit", "mistralai/Mistral-7B-Instruct-v0.3")
