"""train_unsloth.py on the CPU path: the real TRL SFTTrainer on the tiny model with the real tokenizer."""

import json
import signal

import pytest
import torch

from conftest import load_adapter, run_script, start_script, wait_for

# The default batching (token budget): resuming must also find its place in the length-grouped batches
SHORT = ["--config", "configs/smoke.yaml", "--max_steps", "12", "--save_steps", "4", "--eval_steps", "100",
         "--logging_steps", "1", "--eval_fraction", "0", "--token_budget", "1024"]


def test_smoke_run_lowers_eval_loss_and_writes_every_output(trained_adapter, tiny_model):
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    first, last = metrics["eval_loss"][0], metrics["eval_loss"][-1]
    assert first["step"] == 0
    assert last["loss"] < first["loss"] - 2.0, metrics["eval_loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "tokenizer_config.json",
                 "config.yaml", "metrics.json", "loss.png", "manifest.json"):
        assert (trained_adapter / name).is_file(), name
    assert list(trained_adapter.glob("checkpoint-*")), "no checkpoint written"
    assert metrics["real_tokens_seen"] > 0 and metrics["throughput_after_warmup"]["real_tokens_per_second"] > 0
    manifest = json.loads((trained_adapter / "manifest.json").read_text())
    assert manifest["versions"]["trl"] and manifest["versions"]["transformers"] and len(manifest["data_fingerprint"]) == 64

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "adapter did not load trained weights"


def test_trl_cpu_fallback_matches_full_logits_cross_entropy(tiny_model):
    """The plain-PyTorch stand-in for TRL's Triton kernel gives the model's own cross-entropy."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qlora.compat import patch_trl_without_triton

    patch_trl_without_triton()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    reference = model(input_ids=ids, labels=labels).loss
    add_fused_lm_head(model)
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_sigkill_then_resume_matches_uninterrupted_run(fixture_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("train_unsloth.py", *SHORT, "--output_dir", str(straight))

    process = start_script("train_unsloth.py", *SHORT, "--output_dir", str(killed), log=tmp_path / "killed.log")
    wait_for(killed / "checkpoint-4", process)
    process.send_signal(signal.SIGKILL)  # mid-training, no chance to clean up
    process.wait()
    assert not (killed / "adapter_config.json").exists()

    run_script("train_unsloth.py", "--config", str(killed / "config.yaml"), "--resume")
    a, b = load_adapter(straight), load_adapter(killed)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed adapter differs by {worst}"
    # metrics.json counts the whole run, not only the steps since the resume
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (straight, killed)]
    assert [m["global_step"] for m in metrics] == [12, 12]
    assert [p["step"] for p in metrics[1]["train_loss"]] == list(range(1, 13))
    assert metrics[1]["real_tokens_seen"] == metrics[0]["real_tokens_seen"]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(fixture_dir, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    process = start_script("train_unsloth.py", *SHORT, "--max_steps", "200", "--output_dir", str(out), log=log)
    wait_for(out / "checkpoint-4", process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 143, output[-2000:]
    assert "--resume" in output
    assert not list(out.glob(".checkpoint-staging/*")), "a staging checkpoint was left behind"
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert newest > 4 and (out / f"checkpoint-{newest}" / "trainer_state.json").is_file()


def test_refuses_to_overwrite_a_finished_run(trained_adapter):
    result = run_script("train_unsloth.py", "--config", str(trained_adapter / "config.yaml"), check=False)
    assert result.returncode != 0
    assert "--overwrite_output_dir" in result.stderr and str(trained_adapter) in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen without a GPU")
def test_gpu_preset_without_cuda_names_the_smoke_preset(tmp_path):
    result = run_script("train_unsloth.py", "--output_dir", str(tmp_path / "x"), check=False)
    assert result.returncode != 0
    assert "no CUDA GPU" in result.stderr and "configs/smoke.yaml" in result.stderr
    assert not (tmp_path / "x").exists()


def test_data_left_in_the_output_folder_is_prepared_again_when_the_data_settings_change(tiny_model, sample_data,
                                                                                       tmp_path):
    """A run that died before its first checkpoint leaves output_dir/data; the next run with another data set or
    max_seq_length must not train on it."""
    from qlora.config import Config
    from qlora.prepared import load_data

    config = Config(dataset=str(sample_data), model_name=str(tiny_model), output_dir=str(tmp_path), eval_fraction=0.0)
    first = len(load_data(config)["train"])
    assert first > 7 and len(load_data(config)["train"]) == first  # the same settings: reused
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(open(sample_data).readlines()[:7]))
    assert len(load_data(Config(**{**config.__dict__, "dataset": str(fewer)}))["train"]) == 7


def test_settings_the_trainer_would_refuse_late_are_refused_before_loading():
    from qlora.config import Config
    from qlora.errors import RunError
    from qlora.feeding import check_settings

    with pytest.raises(RunError, match=r"--token_budget 512 is smaller than the longest training row \(704"):
        check_settings(Config(token_budget=512), 704, has_eval=False)
    with pytest.raises(RunError, match=r"--save_steps \(100\) must be a multiple of --eval_steps \(30\)"):
        check_settings(Config(early_stopping_patience=2, eval_steps=30), 704, has_eval=True)
    check_settings(Config(token_budget=1024, early_stopping_patience=2, eval_steps=50), 704, has_eval=True)
    with pytest.raises(RunError, match=r"--checkpoint_skip_layers is Unsloth's \(--backend unsloth\)"):
        check_settings(Config(checkpoint_skip_layers=4), 704, has_eval=False, backend="hf")
    for skip in (-1, 33):
        with pytest.raises(RunError, match=rf"--checkpoint_skip_layers must be auto or 0 to 32 .*got {skip}"):
            check_settings(Config(checkpoint_skip_layers=skip), 704, has_eval=False)
    with pytest.raises(RunError, match=r"needs --gradient_checkpointing true or auto, not false"):
        check_settings(Config(checkpoint_skip_layers=4, gradient_checkpointing="false"), 704, has_eval=False)
    check_settings(Config(checkpoint_skip_layers=32, gradient_checkpointing="true"), 704, has_eval=False)


def test_on_a_cpu_the_plan_keeps_every_setting_concrete():
    """config.yaml holds numbers, not auto, so that --resume replays the run; nothing is recomputed on a CPU."""
    from qlora.config import Config
    from qlora.feeding import plan_feeding

    config, plan = plan_feeding(Config(), "cpu", longest_row=704)
    assert plan is None
    assert (config.token_budget, config.gradient_checkpointing, config.checkpoint_skip_layers) == (12288, "false", 0)


def test_profile_writes_a_trace_with_python_stacks(fixture_dir, tmp_path):
    import gzip

    out = tmp_path / "run"
    run_script("train_unsloth.py", *SHORT, "--max_steps", "5", "--save_steps", "100", "--profile_steps", "1",
               "--output_dir", str(out))
    assert "GPU busy" in (out / "profile.txt").read_text()
    with gzip.open(out / "profile.trace.json.gz", "rt") as f:
        categories = {event.get("cat") for event in json.load(f)["traceEvents"]}
    assert {"cpu_op", "python_function"} <= categories, categories
    # the gap finder explains GPU idle time; on a CPU trace it says so in one line instead of failing
    result = run_script("scripts/trace_gaps.py", str(out / "profile.trace.json.gz"), check=False)
    assert result.returncode == 1 and "no GPU kernels" in result.stderr, result.stderr
