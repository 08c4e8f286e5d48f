"""GPU checks on the 7.24 B stand-in for Mistral-7B-Instruct-v0.2 (random weights, real tokenizer, exact config).
Skipped without CUDA; on a GPU host: `pytest -m gpu -s` (set MISTRAL_TOKENIZER_MODEL where mistral-common is absent).
"""

import json
import signal
from pathlib import Path

import pytest

from bench import standins
from conftest import load_adapter, run_script, start_script, wait_for
from qlora import fixtures

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The 7.24 B stand-in: QLORA_STANDIN names one already built (bench/bench_train.py builds the same), else built."""
    import os

    if os.environ.get("QLORA_STANDIN"):
        return Path(os.environ["QLORA_STANDIN"])
    return standins.save_standin(tmp_path_factory.mktemp("standin") / "mistral-7b-v0.2-standin")


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory):
    return fixtures.write_jsonl(tmp_path_factory.mktemp("data") / "sample.jsonl", fixtures.sample_rows())


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_train_50_steps_on_the_standin(backend, standin, sample_file, tmp_path):
    """The default recipe, 50 steps on the sample set."""
    out = tmp_path / backend
    run_script("train_unsloth.py", "--backend", backend, "--model_name", str(standin), "--dataset", str(sample_file),
               "--max_steps", "50", "--save_steps", "25", "--eval_steps", "25", "--output_dir", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [p["loss"] for p in metrics["train_loss"]]
    print(f"\n{backend}: {metrics['global_step']} steps, {metrics['throughput_after_warmup']}, peak "
          f"{metrics['peak_gpu_memory_gib']:.1f} GiB, padding {metrics['padding_share']:.0%}, wall "
          f"{metrics['wall_time_s']:.0f} s\n  train loss: {losses}\n  eval loss: {metrics['eval_loss']}")
    assert metrics["global_step"] == 50
    assert all(loss == loss and loss < 12 for loss in losses), losses  # finite, near ln(32000) at worst
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-50").is_dir()


def step_losses(run_dir) -> dict:
    return {p["step"]: p["loss"] for p in json.loads((run_dir / "metrics.json").read_text())["train_loss"]}


def loss_gap(a: dict, b: dict) -> float:
    return max(abs(a[step] - b[step]) / a[step] for step in a)


def lora_b_gap(a: dict, b: dict) -> float:
    """|a - b| / |a| over all LoRA B matrices together (they start at zero: all of them is what training did)."""
    keys = [k for k in a if "lora_B" in k]
    return (sum((a[k].float() - b[k].float()).norm() ** 2 for k in keys).sqrt()
            / sum(a[k].float().norm() ** 2 for k in keys).sqrt()).item()


def test_unsloth_run_killed_then_resumed_matches_an_uninterrupted_one(standin, sample_file, tmp_path):
    """SIGKILL after checkpoint-3 of 12 steps, then --resume: per-step losses and adapter as close to an uninterrupted
    run as a second uninterrupted run is (the GPU's own run-to-run noise, bf16 and 4-bit kernels). A wrong data
    position or a lost optimizer state would land far outside it."""
    args = ["--model_name", str(standin), "--dataset", str(sample_file), "--max_steps", "12", "--save_steps", "3",
            "--logging_steps", "1", "--eval_fraction", "0"]
    straight, again, killed = tmp_path / "straight", tmp_path / "again", tmp_path / "killed"
    for out in (straight, again):
        run_script("train_unsloth.py", *args, "--output_dir", str(out))
    process = start_script("train_unsloth.py", *args, "--output_dir", str(killed), log=tmp_path / "killed.log")
    wait_for(killed / "checkpoint-3", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter_config.json").exists(), "the run ended before the kill"
    resumed = run_script("train_unsloth.py", "--config", str(killed / "config.yaml"), "--resume")
    assert f"resuming from {killed / 'checkpoint-3'}" in resumed.stdout

    losses = {run: step_losses(run) for run in (straight, again, killed)}
    adapters = {run: load_adapter(run) for run in (straight, again, killed)}
    assert all(sorted(steps) == list(range(1, 13)) for steps in losses.values())
    noise = (loss_gap(losses[straight], losses[again]), lora_b_gap(adapters[straight], adapters[again]))
    resume = (loss_gap(losses[straight], losses[killed]), lora_b_gap(adapters[straight], adapters[killed]))
    print(f"\nrelative differences to the uninterrupted run (per-step loss, LoRA B): second uninterrupted run "
          f"{noise[0]:.2e}, {noise[1]:.2e}; killed and resumed {resume[0]:.2e}, {resume[1]:.2e}")
    assert resume[0] <= 2 * max(noise[0], 1e-4) and resume[1] <= 2 * max(noise[1], 1e-3)


def test_unsloth_samples_leave_the_training_as_it_was(standin, sample_file, tmp_path):
    """Samples at the start and every 4 steps of 12 go through Unsloth's inference mode and back, whose for_training
    turns gradient checkpointing on in every layer: with 4 layers keeping their activations, per-step losses, adapter
    and peak memory must stay as close to a run without samples as a second run without them is."""
    args = ["--model_name", str(standin), "--dataset", str(sample_file), "--max_steps", "12", "--save_steps", "4",
            "--eval_steps", "4", "--logging_steps", "1", "--token_budget", "4096", "--gradient_checkpointing", "true",
            "--checkpoint_skip_layers", "4"]
    without, again, sampled = tmp_path / "without", tmp_path / "again", tmp_path / "sampled"
    for out in (without, again):
        run_script("train_unsloth.py", *args, "--sample_count", "0", "--output_dir", str(out))
    result = run_script("train_unsloth.py", *args, "--output_dir", str(sampled))
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in (without, again, sampled)}
    losses = {run: step_losses(run) for run in metrics}
    adapters = {run: load_adapter(run) for run in metrics}
    noise = (loss_gap(losses[without], losses[again]), lora_b_gap(adapters[without], adapters[again]))
    samples = (loss_gap(losses[without], losses[sampled]), lora_b_gap(adapters[without], adapters[sampled]))
    peaks = {run.name: round(m["peak_gpu_memory_gib"], 2) for run, m in metrics.items()}
    walls = {run.name: round(m["wall_time_s"], 1) for run, m in metrics.items()}
    print(f"\nrelative differences to a run without samples (per-step loss, LoRA B): second run without "
          f"{noise[0]:.2e}, {noise[1]:.2e}; with samples {samples[0]:.2e}, {samples[1]:.2e}; peak GiB {peaks}; "
          f"wall s {walls}\n" + "\n".join(line for line in result.stdout.splitlines() if line.startswith("sample @")))
    assert [s["step"] for s in metrics[sampled]["samples"]] == [0, 4, 8, 12]
    assert samples[0] <= 2 * max(noise[0], 1e-4) and samples[1] <= 2 * max(noise[1], 1e-3)
    assert abs(peaks["sampled"] - peaks["without"]) <= 0.03 * peaks["without"], peaks


CAPITALS = {"Arvenia": "Lumeport", "Bostrava": "Kell", "Caldoria": "Mirath", "Dunmere": "Oskville"}


def test_infer_answers_what_the_adapter_learned(standin, tmp_path):
    """A random base learns little in 50 steps of the mixed sample set, so this run memorises four answers (150 steps
    at lr 1e-3); infer.py must then give them word for word, up to EOS, with Unsloth's fast inference and with
    transformers, batched and one prompt at a time."""
    rows = [{"text": f"<s>[INST] What is the capital of {c}? [/INST] The capital of {c} is {city}. </s>"}
            for c, city in CAPITALS.items()]
    out = tmp_path / "run"
    run_script("train_unsloth.py", "--model_name", str(standin), "--dataset", str(fixtures.write_jsonl(tmp_path / "four.jsonl",
               rows)), "--eval_fraction", "0", "--token_budget", "512", "--learning_rate", "1e-3", "--max_steps", "150",
               "--output_dir", str(out))
    prompts = fixtures.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is the capital of {c}?"} for c in CAPITALS])
    expected = [f"The capital of {c} is {city}." for c, city in CAPITALS.items()]
    for backend, batch_size in (("unsloth", "4"), ("unsloth", "1"), ("hf", "4")):
        answers = tmp_path / f"answers-{backend}-{batch_size}.jsonl"
        run_script("infer.py", str(out), "--backend", backend, "--batch_size", batch_size, "--input", str(prompts),
                   "--output", str(answers), "--temperature", "0", "--max_new_tokens", "24")
        got = [json.loads(line)["answer"] for line in answers.read_text().splitlines()]
        print(f"\ninfer.py --backend {backend} --batch_size {batch_size}: {got}")
        assert got == expected, (backend, batch_size)


def seed_whose_first_batch_is(row: int, lengths: list[int], budget: int) -> int:
    """A seed for which the real sampler puts row `row` alone in the first micro-batch."""
    from qlora.batching import TokenBudgetBatches

    return next(seed for seed in range(100) if TokenBudgetBatches(lengths, budget, seed).batches()[0] == [row])


def test_out_of_memory_saves_the_last_step_says_what_to_lower_and_resumes(standin, tmp_path):
    """Step 1 is one row of about 1,900 tokens; the next micro-batches hold 80,000-120,000 tokens of equal short rows,
    whose activations without checkpointing (3.75 MiB a token) need far more than 80 GiB. The run must keep step 1 as
    a checkpoint, say what to lower, and resume from it with a smaller token budget."""
    rows = [{"text": f"<s>[INST] Count from 1 to 399. [/INST] {', '.join(str(n) for n in range(1, 400))} </s>"}]
    rows += [{"text": f"<s>[INST] Repeat word{i}. [/INST] {' '.join([f'word{i}'] * 120)} </s>"}
             for i in range(100, 500)]
    data = tmp_path / "data"
    run_script("data_prep.py", "--dataset", str(fixtures.write_jsonl(tmp_path / "rows.jsonl", rows)), "--model_name",
               str(standin), "--eval_fraction", "0", "--output_dir", str(data))
    from qlora.data import load_prepared

    lengths = [len(ids) for ids in load_prepared(data)["train"]["input_ids"]]
    seed = seed_whose_first_batch_is(lengths.index(max(lengths)), lengths, 120000)
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", "--model_name", str(standin), "--dataset", str(data), "--seed", str(seed),
                        "--token_budget", "120000", "--gradient_checkpointing", "false", "--max_steps", "3",
                        "--output_dir", str(out), check=False)
    advice = ("CUDA out of memory", "Lower", "No step", "Step ")
    print("\n" + "\n".join(line for line in result.stderr.splitlines() if line.startswith(advice)))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "CUDA out of memory at step 2" in result.stderr and "--token_budget (now 120000)" in result.stderr
    assert f"Step 1 is in {out / 'checkpoint-1'}" in result.stderr
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()

    resumed = run_script("train_unsloth.py", "--config", str(out / "config.yaml"), "--resume", "--token_budget", "4096")
    assert f"resuming from {out / 'checkpoint-1'}" in resumed.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_end_like_one_process(standin, sample_file, tmp_path):
    """torchrun on 2 GPUs (NCCL): one adapter and one metrics.json, whose token count is the sum over both ranks: the
    same as one process accumulating the two ranks' batches (the sampler deals the same batches per optimizer step)."""
    import subprocess
    import sys

    from conftest import ROOT

    args = ["--model_name", str(standin), "--dataset", str(sample_file), "--max_steps", "6", "--eval_fraction", "0",
            "--token_budget", "4096", "--gradient_accumulation_steps", "2", "--save_steps", "3", "--logging_steps", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train_unsloth.py", *args, "--output_dir", str(one))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_unsloth.py",
                             *args, "--output_dir", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("done:") == 1 and "x 1 accumulation x 2 process(es)" in result.stdout
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in (one, two)}
    print(f"\n1 GPU: {metrics[one]['throughput_after_warmup']}; 2 GPUs: {metrics[two]['throughput_after_warmup']}")
    assert metrics[two]["global_step"] == 6 and metrics[two]["real_tokens_seen"] == metrics[one]["real_tokens_seen"]
    assert (two / "adapter_model.safetensors").is_file() and (two / "loss.png").is_file()
    assert (two / "manifest.json").is_file() and not list(two.glob(".*staging*"))


# Run before anything else in the training process (a sitecustomize on PYTHONPATH). Unsloth decides bf16 from the compute
# capability (8.0 and up) and then answers torch.cuda.is_bf16_supported itself, so its capability for that decision is
# made a T4's (7.5). torch.cuda.get_device_capability stays true: made 7.5 too, torch.compile built sm_75 kernels that
# the H200 cannot run ("no kernel image is available").
SEE_A_T4 = """
import importlib.abc, importlib.util, sys
import torch

torch.cuda.is_bf16_supported = lambda *args, **kwargs: False


class SeeAT4(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "unsloth.device_type":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.cuda_bf16_capability = lambda: (7, 5)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, SeeAT4())
"""


def test_fp16_on_a_card_without_bf16_trains_in_15_gib(standin, tmp_path):
    """A T4 has no bf16: torch and Unsloth's dtype probe are made to see a T4 (a sitecustomize run before anything
    else), so Unsloth computes in fp16 with a gradient scaler; with 15 GiB free, as on a 16 GB card. The planner's
    plan must fit (fp16 activations are bf16's size) and 30 steps must give a finite, falling loss."""
    import math
    import os

    from bench.bench_train import gpu_memory_free

    shim = tmp_path / "no-bf16"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SEE_A_T4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    data = fixtures.write_jsonl(tmp_path / "guanaco_shaped.jsonl", standins.guanaco_shaped_rows())
    out = tmp_path / "run"
    with gpu_memory_free(15):
        result = run_script("train_unsloth.py", "--model_name", str(standin), "--dataset", str(data), "--max_steps",
                            "30", "--eval_fraction", "0", "--logging_steps", "5", "--output_dir", str(out), env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [p["loss"] for p in metrics["train_loss"]]
    print(f"\nfp16, 15 GiB free: {metrics['plan']['summary']}\n  {metrics['throughput_after_warmup']}, peak "
          f"{metrics['peak_gpu_memory_gib']:.1f} GiB\n  train loss: {losses}")
    assert "precision: fp16" in result.stdout
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 1.0, losses
    assert metrics["peak_gpu_memory_gib"] < 15 and metrics["plan"]["predicted_bytes"] < 15 * 2**30


def test_calibrates_caches_and_trains_10_steps(standin, tmp_path):
    """A first run measures the card (qlora/calibrate.py), keeps the figures in the cache and in metrics.json, plans
    from them and trains 10 steps; a second run on the same card reads them from the cache and measures nothing."""
    import math

    cache = tmp_path / "cache"
    data = fixtures.write_jsonl(tmp_path / "guanaco_shaped.jsonl", standins.guanaco_shaped_rows())
    args = ["--model_name", str(standin), "--dataset", str(data), "--eval_fraction", "0", "--logging_steps", "2"]
    first = run_script("train_unsloth.py", *args, "--max_steps", "10", "--output_dir", str(tmp_path / "first"),
                       env={"QLORA_MISTRAL_CACHE": str(cache)})
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    calibration = metrics["plan"]["calibration"]
    print("\n" + "\n".join(line for line in first.stdout.splitlines() if line.startswith(("calibration", "plan:")))
          + f"\n  {metrics['throughput_after_warmup']}, peak {metrics['peak_gpu_memory_gib']:.1f} GiB")
    assert "calibration, measured in" in first.stdout and calibration["cached"] is None
    assert len(list(cache.glob("calibration-*.json"))) == 1
    per_token = calibration["figures"]["seconds_per_token"]
    assert 0 < per_token["false"] <= per_token["true"] <= per_token["unsloth"] < 0.01, per_token
    assert metrics["plan"]["figures"] == calibration["figures"]
    assert metrics["global_step"] == 10 and all(math.isfinite(p["loss"]) for p in metrics["train_loss"])

    second = run_script("train_unsloth.py", *args, "--max_steps", "2", "--output_dir", str(tmp_path / "second"),
                        env={"QLORA_MISTRAL_CACHE": str(cache)})
    again = json.loads((tmp_path / "second" / "metrics.json").read_text())["plan"]
    assert "calibration, cached" in second.stdout and "measured in" not in second.stdout
    assert again["figures"] == calibration["figures"] and again["calibration"]["cached"]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    return fixtures.write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", fixtures.sample_preference_rows())


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_dpo_after_sft_and_orpo_from_the_base(backend, standin, sample_file, pairs_file, tmp_path):
    """SFT for 12 steps, DPO from its adapter and ORPO from the base for 8 steps each, on the 4-bit stand-in: the
    trainers run on the card's 4-bit model, DPO's reference (the SFT adapter) gives a zero margin before the first
    step, and every adapter is saved whole."""
    import math

    common = ["--backend", backend, "--model_name", str(standin), "--eval_steps", "4", "--logging_steps", "1",
              "--eval_fraction", "0.2"]
    sft, dpo, orpo = tmp_path / "sft", tmp_path / "dpo", tmp_path / "orpo"
    run_script("train_unsloth.py", *common, "--dataset", str(sample_file), "--max_steps", "12", "--output_dir", str(sft))
    for method, out, extra in (("dpo", dpo, ["--init_adapter", str(sft)]), ("orpo", orpo, [])):
        run_script("train_unsloth.py", *common, "--method", method, "--dataset", str(pairs_file), *extra,
                   "--max_steps", "8", "--learning_rate", "5e-5", "--output_dir", str(out))
    for out in (dpo, orpo):
        metrics = json.loads((out / "metrics.json").read_text())
        rewards = metrics["rewards"]
        print(f"\n{backend} {out.name}: peak {metrics['peak_gpu_memory_gib']:.1f} GiB, "
              f"{metrics['throughput_after_warmup']}\n  loss {[p['loss'] for p in metrics['train_loss']]}\n"
              f"  eval margins {rewards['eval_rewards/margins']}\n  eval accuracies {rewards['eval_rewards/accuracies']}")
        assert metrics["global_step"] == 8 and all(math.isfinite(p["loss"]) for p in metrics["train_loss"])
        assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert abs(json.loads((dpo / "metrics.json").read_text())["rewards"]["eval_rewards/margins"][0]["value"]) < 1e-3
