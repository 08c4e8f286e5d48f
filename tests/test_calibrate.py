"""The calibration cache (qlora/calibrate.py): a card's figures kept under its key and read back by the next run."""

from qlora import calibrate, planner
from qlora.config import Config
from qlora.feeding import cached_calibration

KEY = {"gpu": "NVIDIA H200", "sms": 132, "memory": 150754820096, "mps_sm_percent": "8", "driver": "580.159.04",
       "torch": "2.11.0+cu130", "unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "dtype": "bfloat16",
       "model": "unsloth/mistral-7b-instruct-v0.2-bnb-4bit", "load_in_4bit": True, "max_seq_length": 2048,
       "lora": [8, 0.0, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]]}
FIGURES = planner.Figures({"false": 6e-4, "true": 8.1e-4, "unsloth": 8.3e-4}, 0.03, 0.02, 2**29, "measured on a card")


def test_figures_round_trip_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibrate.CACHE_ENV, str(tmp_path / "cache"))
    assert calibrate.load_cached(KEY) is None
    path = calibrate.save(KEY, {"figures": FIGURES.as_dict(), "seconds": 12.5, "first_pass_seconds": 40.0})
    assert path.parent == tmp_path / "cache" and [p.name for p in path.parent.iterdir()] == [path.name]
    record = calibrate.load_cached(KEY)
    assert planner.Figures.from_dict(record["figures"]) == FIGURES and record["cached"] == str(path)
    assert "calibration, cached" in calibrate.describe(record) and "600 us keeping" in calibrate.describe(record)
    # another share of the SMs, or another Unsloth, is another card to the planner
    assert calibrate.load_cached({**KEY, "mps_sm_percent": "20"}) is None
    assert calibrate.load_cached({**KEY, "unsloth": "2026.11.1"}) is None


def test_an_unreadable_cache_file_is_measured_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(calibrate.CACHE_ENV, str(tmp_path))
    calibrate.cache_path(KEY).write_text('{"figures": {"seconds_per_token": ', encoding="utf-8")
    assert calibrate.load_cached(KEY) is None
    assert "unreadable calibration" in capsys.readouterr().out
    calibrate.cache_path(KEY).write_text('{"figures": {"speed": 1}}', encoding="utf-8")  # fields of another version
    assert calibrate.load_cached(KEY) is None


def test_only_planned_unsloth_runs_calibrate():
    assert cached_calibration(Config(), "cpu") == (None, False)
    assert cached_calibration(Config(calibrate=False), "unsloth") == (None, False)
    fixed = Config(token_budget=4096, gradient_checkpointing="true", checkpoint_skip_layers=0)
    assert cached_calibration(fixed, "unsloth") == (None, False)


def test_a_run_with_much_more_free_memory_measures_again():
    """Figures measured with 15 GiB free came from micro-batches that fit there; with all of an H200's memory the
    planner would use ones several times larger, so they are measured again, not extrapolated."""
    record = {"figures": FIGURES.as_dict(), "free_bytes": 15 * 2**30}
    assert not calibrate.outgrown(record, 15 * 2**30) and not calibrate.outgrown(record, 18 * 2**30)
    assert calibrate.outgrown(record, 23 * 2**30)
    assert not calibrate.outgrown({"figures": FIGURES.as_dict()}, 140 * 2**30)  # a record of before: kept


def test_passes_too_short_for_a_fast_card_are_bounded_by_recomputing():
    """The whole H200 with 15 GiB free (2026-12-03): keeping every activation fitted only passes of 984 and 1,952
    tokens, bound by the host's launches (15 us a token), while recomputing reached 11,808 tokens (77 us). Planned from
    the raw slopes, the run kept 31 layers in micro-batches of 2,458 tokens and ran at 8,228 padded tokens/s against
    12,580 predicted; with keeping bounded to recomputing's cost it recomputes in one micro-batch of 12,288, which ran
    at 12,028."""
    keep, recompute = ((984, 0.204), (1952, 0.218)), ((7936, 0.727), (11808, 1.024))
    measured = {"false": calibrate.slope(keep), "true": calibrate.slope(recompute)}
    assert round(measured["false"] * 1e6) == 14 and round(measured["true"] * 1e6) == 77
    per_token = calibrate.bounded(measured, "true", moved=9.5e-6)
    assert per_token["false"] == measured["true"] / calibrate.RECOMPUTE_AT_MOST and per_token["true"] == measured["true"]
    assert per_token["unsloth"] == measured["true"] + 9.5e-6
    figures = planner.Figures(per_token, 0.118, 0.002, 2**30)
    chosen = planner.plan(int(14.3 * 2**30), 12288, 2048, "unsloth", figures=figures)
    assert (chosen.checkpointing, chosen.micro_tokens) == ("true", 12288) and chosen.skip_layers <= 2
    assert 0.8 < chosen.predicted_tokens_per_second / 12_028 < 1.2


def test_a_keep_slope_in_range_is_kept_and_recomputing_is_raised_to_its_bound():
    """The same card with 23 GiB free: keeping measured 58 us up to 3,872 tokens, recomputing 76 us (1.31 times)."""
    per_token = calibrate.bounded({"false": 58e-6, "true": 76e-6}, "true", moved=9.5e-6)
    assert per_token["false"] == 58e-6 and per_token["true"] == calibrate.RECOMPUTE_AT_LEAST * 58e-6
    offloaded = calibrate.bounded({"false": 58e-6, "unsloth": 95e-6}, "unsloth", moved=9.5e-6)
    assert offloaded["unsloth"] == 95e-6 and offloaded["true"] == 95e-6 - 9.5e-6


def test_looking_up_the_calibration_without_a_gpu_is_one_line():
    import subprocess
    import sys

    import pytest
    import torch

    from conftest import ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    done = subprocess.run([sys.executable, "-m", "qlora.calibrate"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: the calibration is of a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)"]
