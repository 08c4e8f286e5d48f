"""One run at a time in an output folder, and resuming only from checkpoints that read back whole (qlora.runfolder),
through train_unsloth.py and export_gguf.py on the tiny model."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import load_adapter, run_script, start_script, wait_for
from qlora import runfolder

SIX = ["--config", "configs/smoke.yaml", "--max_steps", "6", "--save_steps", "2", "--eval_steps", "100",
       "--logging_steps", "1", "--eval_fraction", "0", "--token_budget", "1024"]
FINAL = ("adapter_config.json", "adapter_model.safetensors", "metrics.json")  # what a run writes when it ends


@pytest.fixture(scope="module")
def six_steps(fixture_dir, tmp_path_factory):
    """An uninterrupted run of 6 steps with checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("six") / "run"
    run_script("train_unsloth.py", *SIX, "--output_dir", str(out))
    return out


def killed_at_step_5(six_steps, folder):
    """The folder as a run killed during step 5 leaves it: checkpoints 2 and 4, no adapter, no metrics."""
    shutil.copytree(six_steps, folder)
    shutil.rmtree(folder / "checkpoint-6")
    for name in FINAL:
        (folder / name).unlink()
    return folder


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def assert_one_error_line(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


DAMAGE = {"truncated adapter": ("adapter_model.safetensors", truncate),
          "truncated trainer_state.json": ("trainer_state.json", truncate),
          "deleted optimizer.pt": ("optimizer.pt", lambda file: file.unlink())}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_complete_one(six_steps, tmp_path, damage):
    run = killed_at_step_5(six_steps, tmp_path / "run")
    name, spoil = DAMAGE[damage]
    spoil(run / "checkpoint-4" / name)

    result = run_script("train_unsloth.py", "--config", str(run / "config.yaml"), "--output_dir", str(run),
                        "--resume")
    assert f"checkpoint-4 is damaged ({name}" in result.stdout, result.stdout[-3000:]
    assert "resuming from checkpoint-2, the newest complete checkpoint" in result.stdout
    # the run goes on from step 2 into the same model as the uninterrupted one (not into another one, as with an
    # optimizer state left out)
    a, b = load_adapter(six_steps), load_adapter(run)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed adapter differs by {worst}"
    # and its metrics.json counts the whole run: steps 1-6 and every token, not only those since the resume
    straight, resumed = (json.loads((d / "metrics.json").read_text()) for d in (six_steps, run))
    assert [p["step"] for p in resumed["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in resumed["steps"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["real_tokens_seen"] == straight["real_tokens_seen"]
    assert [p["real_tokens"] for p in resumed["steps"]] == [p["real_tokens"] for p in straight["steps"]]
    assert resumed["wall_time_s"] > resumed["steps"][-1]["seconds"]


def test_no_complete_checkpoint_is_one_line(six_steps, tmp_path):
    run = killed_at_step_5(six_steps, tmp_path / "run")
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    truncate(run / "checkpoint-2" / "rng_state.pth")

    result = run_script("train_unsloth.py", "--config", str(run / "config.yaml"), "--output_dir", str(run),
                        "--resume", check=False)
    line = assert_one_error_line(result)
    assert "no complete checkpoint to resume from" in line and "--overwrite_output_dir" in line
    assert "checkpoint-4 is damaged (optimizer.pt missing)" in line and "checkpoint-2 is damaged (rng_state.pth" in line


def test_resume_from_the_last_step_writes_the_adapter_without_training(six_steps, tmp_path):
    """Killed after the last checkpoint, before the adapter: the Trainer would train a step past max_steps."""
    run = tmp_path / "run"
    shutil.copytree(six_steps, run)
    for name in FINAL:
        (run / name).unlink()
    result = run_script("train_unsloth.py", "--config", str(run / "config.yaml"), "--output_dir", str(run),
                        "--resume")
    assert "checkpoint-6 holds the run's last step" in result.stdout
    a, b = load_adapter(six_steps), load_adapter(run)
    assert all((a[k] == b[k]).all() for k in a)
    straight, resumed = (json.loads((d / "metrics.json").read_text()) for d in (six_steps, run))
    assert resumed["global_step"] == 6 and resumed["real_tokens_seen"] == straight["real_tokens_seen"]


def test_resume_on_a_finished_run_says_so_and_trains_nothing(six_steps):
    before = {p.name: p.read_bytes() for p in six_steps.iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in six_steps.glob("checkpoint-*"))

    result = run_script("train_unsloth.py", "--config", str(six_steps / "config.yaml"), "--resume")
    assert "the run is finished (6 steps" in result.stdout and "nothing to resume" in result.stdout
    assert {p.name: p.read_bytes() for p in six_steps.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in six_steps.glob("checkpoint-*")) == checkpoints


def test_a_stale_lock_is_taken_over(six_steps):
    lock = runfolder.lock_path(six_steps)
    gone = dead_pid()
    lock.write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "command": "train_unsloth.py"}))

    result = run_script("train_unsloth.py", "--config", str(six_steps / "config.yaml"), "--resume")
    assert f"pid {gone} (train_unsloth.py)" in result.stdout and "is gone; taking its lock over" in result.stdout
    assert "the run is finished" in result.stdout
    assert not lock.exists(), "the lock outlived its run"


def test_two_trainings_into_one_folder_the_second_is_refused(fixture_dir, tmp_path):
    out = tmp_path / "run"
    first = start_script("train_unsloth.py", *SIX, "--max_steps", "2", "--output_dir", str(out),
                         log=tmp_path / "first.log")
    try:
        wait_for(runfolder.lock_path(out), first)
        first.send_signal(signal.SIGSTOP)  # holds the lock, whatever the speed of this machine
        second = run_script("train_unsloth.py", *SIX, "--max_steps", "2", "--output_dir", str(out), check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    line = assert_one_error_line(second)
    assert f"is in use by pid {first.pid} (train_unsloth.py)" in line, line
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert (out / "adapter_config.json").is_file() and not runfolder.lock_path(out).exists()


def test_an_export_into_a_folder_in_use_is_refused(six_steps, tmp_path):
    export_dir = tmp_path / "export"
    with runfolder.locked(export_dir):
        result = run_script("export_gguf.py", "--adapter_dir", str(six_steps), "--export_dir", str(export_dir),
                            check=False)
    line = assert_one_error_line(result)
    assert f"{export_dir} is in use by pid {os.getpid()}" in line, line
    assert not export_dir.exists()


def test_a_second_ctrl_c_ends_in_one_line(fixture_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = start_script("train_unsloth.py", *SIX, "--max_steps", "200", "--save_steps", "1", "--output_dir",
                           str(out), log=log)
    wait_for(out / "checkpoint-1", process)  # training, with the signal handlers in place
    process.send_signal(signal.SIGINT)
    while "saving a checkpoint after this step" not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    assert "SIGINT again: stopped at once" in output and "--resume" in output


def test_a_folder_is_held_once():
    """Also within one process: the lock belongs to the open lock file, not to the pid."""
    import tempfile

    with tempfile.TemporaryDirectory() as parent:
        folder = os.path.join(parent, "run")
        with runfolder.locked(folder):
            with pytest.raises(runfolder.Locked, match=rf"run is in use by pid {os.getpid()} "):
                with runfolder.locked(folder):
                    pass
        with runfolder.locked(folder):  # released: free again
            pass
        assert os.listdir(parent) == []


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    """Some network and FUSE file systems have no flock; there a lock is held while its pid lives."""
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfolder.fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    live = subprocess.Popen(["sleep", "600"])
    try:
        runfolder.lock_path(folder).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                                           "command": "train_unsloth.py"}))
        with pytest.raises(runfolder.Locked, match=rf"in use by pid {live.pid} \(train_unsloth.py\)"):
            with runfolder.locked(folder):
                pass
    finally:
        live.kill()
        live.wait()
    with runfolder.locked(folder):  # its process is gone: taken over
        assert json.loads(runfolder.lock_path(folder).read_text())["pid"] == os.getpid()


def test_a_checkpoint_given_by_path_is_checked_too(six_steps, tmp_path):
    """A flipped byte in the optimizer state is found by the archive's CRC; --resume_from_checkpoint names the fault
    rather than picking another checkpoint."""
    from qlora.config import Config
    from qlora.errors import RunError
    from qlora.runfolder import check_output_dir

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(six_steps / "checkpoint-4", checkpoint)
    assert runfolder.checkpoint_problem(checkpoint) is None
    optimizer = checkpoint / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(data)
    assert "optimizer.pt: damaged (" in runfolder.checkpoint_problem(checkpoint)
    with pytest.raises(RunError, match=r"checkpoint-4: not a complete checkpoint \(optimizer.pt: damaged .*CRC"):
        check_output_dir(Config(output_dir=str(tmp_path), resume_from_checkpoint=str(checkpoint)))
