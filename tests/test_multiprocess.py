"""torchrun with 2 CPU processes (gloo) trains the smoke preset like one process with the same effective batch."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

# Each process takes 8 rows a step; one process accumulates two such batches to see the same 16 rows.
COMMON = ["--config", "configs/smoke.yaml", "--max_steps", "6", "--logging_steps", "1", "--eval_fraction", "0",
          "--save_steps", "3", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]
TOLERANCE = 1e-4  # relative, per optimizer step; measured differences are reported in the failure message


def _losses(run_dir):
    return [p["loss"] for p in json.loads((run_dir / "metrics.json").read_text())["train_loss"]]


@pytest.mark.parametrize("batching", [[], ["--token_budget", "1024"]], ids=["rows", "token_budget"])
def test_two_processes_match_one(fixture_dir, tmp_path, batching):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train_unsloth.py", *COMMON, *batching, "--output_dir", str(one))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "train_unsloth.py", *COMMON, *batching, "--output_dir", str(two)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "x 1 accumulation" in result.stdout
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"\n{batching or 'rows'}: worst relative difference per step {worst:.2e}")
    assert worst <= TOLERANCE, f"per-step losses differ by up to {worst:.2e} (relative): {a} vs {b}"
    # one copy of each output: the main process writes, the other only trains
    assert result.stdout.count("done:") == 1
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(two.glob(".*staging*")) and not list(two.glob(".*tmp*"))
