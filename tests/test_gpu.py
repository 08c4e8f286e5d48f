"""GPU checks on the 7.24 B stand-in for Mistral-7B-Instruct-v0.2 (random weights, real tokenizer, exact config).
Skipped without CUDA; on a GPU host: `pytest -m gpu -s` (set MISTRAL_TOKENIZER_MODEL where mistral-common is absent).
"""

import json

import pytest

from conftest import run_script
from qlora import fixtures

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    return fixtures.save_standin(tmp_path_factory.mktemp("standin") / "mistral-7b-v0.2-standin")


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fixtures.sample_rows()))
    return path


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_train_50_steps_on_the_standin(backend, standin, sample_file, tmp_path):
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
