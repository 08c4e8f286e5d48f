"""The GPU install's decision (qlora/gpu_install.py) over drivers and installed torch builds, and what the scripts say
on a machine whose NVIDIA GPU the installed torch cannot use: a stand-in `nvidia-smi` on PATH reports a T4 with
Colab's driver 550.54.15 (CUDA 12.4), while this machine's CPU build of torch sees no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import standins
from conftest import ROOT, run_script
from qlora import fixtures, gpu
from qlora.gpu_install import PINNED_TORCH, Torch, build_for, decide, in_range, supported_range

SUPPORTED = ">=2.10,<2.15"
DRIVERS = {"none": None, "12.4": (12, 4), "12.8": (12, 8), "13.0": (13, 0)}
TORCHES = {"none": None, "cpu": "2.11.0+cpu", "cu126": "2.11.0+cu126", "cu128": "2.11.0+cu128",
           "cu130": "2.11.0+cu130"}

# (driver, installed torch, torch sees the GPU) -> (action, wheel index to install from). A CUDA 12.x torch runs on
# any 12.x driver (minor version compatibility), a 13.0 one needs a 13.x driver; the newest build the driver runs is
# installed; a torch that fits and still sees no GPU is not replaced (another would not see it either).
EXPECTED = {
    ("none", "none", False): ("no-gpu", None), ("none", "cpu", False): ("no-gpu", None),
    ("none", "cu126", False): ("no-gpu", None), ("none", "cu128", False): ("no-gpu", None),
    ("none", "cu130", False): ("no-gpu", None),
    ("12.4", "none", False): ("install", "cu126"), ("12.4", "cpu", False): ("install", "cu126"),
    ("12.4", "cu126", False): ("stop", None), ("12.4", "cu128", False): ("stop", None),
    ("12.4", "cu130", False): ("install", "cu126"),
    ("12.8", "none", False): ("install", "cu128"), ("12.8", "cpu", False): ("install", "cu128"),
    ("12.8", "cu126", False): ("stop", None), ("12.8", "cu128", False): ("stop", None),
    ("12.8", "cu130", False): ("install", "cu128"),
    ("13.0", "none", False): ("install", "cu130"), ("13.0", "cpu", False): ("install", "cu130"),
    ("13.0", "cu126", False): ("stop", None), ("13.0", "cu128", False): ("stop", None),
    ("13.0", "cu130", False): ("stop", None),
}
# A CUDA torch in the supported range that sees the GPU is kept, whatever the driver reports (Colab's case).
EXPECTED.update({(d, t, True): ("keep", None) for d in DRIVERS for t in ("cu126", "cu128", "cu130")})


def torch_of(name: str, sees: bool) -> Torch | None:
    version = TORCHES[name]
    return None if version is None else Torch(version, None if name == "cpu" else f"{name[2:4]}.{name[4:]}", sees)


@pytest.mark.parametrize("driver,torch,sees", sorted(EXPECTED))
def test_install_decision(driver, torch, sees):
    decision = decide(DRIVERS[driver], torch_of(torch, sees), SUPPORTED)
    assert (decision.action, decision.build) == EXPECTED[(driver, torch, sees)], decision.reason
    if decision.action == "install":
        assert f"torch {PINNED_TORCH}+{decision.build}" in decision.reason and "download.pytorch.org" in decision.reason


def test_the_table_covers_every_combination():
    possible = {(d, t, s) for d in DRIVERS for t in TORCHES for s in (False, True)
                if not (s and t in ("none", "cpu"))}  # neither no torch nor a CPU build sees a GPU
    assert set(EXPECTED) == possible


def test_outside_the_supported_range_is_replaced_even_when_it_works():
    old = Torch("2.9.0+cu126", "12.6", True)  # an older Colab runtime
    decision = decide((12, 4), old, SUPPORTED)
    assert (decision.action, decision.build) == ("install", "cu126")
    assert "outside the supported range" in decision.reason


def test_a_driver_older_than_cuda_12_stops_with_the_driver_to_get():
    decision = decide((11, 8), None, SUPPORTED)
    assert decision.action == "stop" and "525.60.13" in decision.reason


def test_the_range_comes_from_requirements_and_holds_the_pinned_torch():
    assert supported_range() == SUPPORTED
    assert in_range(PINNED_TORCH, SUPPORTED) and in_range("2.10.0+cu128", SUPPORTED)
    assert not in_range("2.9.1+cu126", SUPPORTED) and not in_range("2.15.0", SUPPORTED)


def test_the_kept_torch_is_pinned_as_pip_sees_it(tmp_path):
    """PyPI's CUDA 13.0 torch says "2.11.0+cu130" in torch.__version__ but is distribution 2.11.0: a constraint
    `torch==2.11.0+cu130` matches nothing pip has installed (what the GPU host showed). A torch stand-in of that kind
    on PYTHONPATH, shadowing this environment's: the pin is the distribution's version."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('__version__ = "2.11.0+cu130"\n')
    (tmp_path / "torch-2.11.0.dist-info").mkdir()
    (tmp_path / "torch-2.11.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    python = [sys.executable, "-c", "import sys, qlora.gpu_install as g; print(g.installed_pins(sys.executable)[0])"]
    pins = subprocess.run(python, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert pins == ["torch==2.11.0"]


@pytest.mark.parametrize("driver_version,cuda", [("550.54.15", (12, 4)), ("570.86.10", (12, 8)),
                                                 ("580.65.06", (13, 0)), ("525.60.13", (12, 0)), ("470.82", None)])
def test_cuda_of_a_driver_version(driver_version, cuda):
    assert gpu.cuda_of_driver(driver_version) == cuda


def test_each_build_is_the_newest_the_driver_runs():
    assert [build_for(c) for c in [(12, 0), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0), (13, 2)]] == \
        ["cu126", "cu126", "cu126", "cu128", "cu128", "cu130", "cu130"]


# ---------------------------------------------------------------- a GPU that torch cannot use

NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then echo "GPU 0: Tesla T4 (UUID: GPU-0b6a4c4e-0000-0000-0000-000000000000)"; exit 0; fi
cat <<'EOF'
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
|   0  Tesla T4                       Off |   00000000:00:04.0 Off |                    0 |
+-----------------------------------------------------------------------------------------+
EOF
"""
DRIVER_LINE = "NVIDIA GPU (Tesla T4, driver 550.54.15 (CUDA 12.4)) but torch cannot use it"


@pytest.fixture(scope="module")
def stand_in_gpu(tmp_path_factory) -> dict:
    """PATH with a stand-in nvidia-smi first (this torch is a CPU build: it sees no GPU)."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("needs a CPU build of torch")
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "nvidia-smi"
    script.write_text(NVIDIA_SMI)
    script.chmod(0o755)
    return {"PATH": os.pathsep.join([str(folder), os.environ["PATH"]])}


def check_named(result, stops: bool) -> str:
    """The driver line is printed; where it stops, with a non-zero exit, one `error:` line and no traceback; never
    the smoke-preset advice (this machine has a GPU)."""
    out = result.stdout + result.stderr
    import torch

    assert DRIVER_LINE in out and f"torch {torch.__version__} is a CPU build" in out, out[-3000:]
    assert "sh scripts/install_gpu.sh" in out
    assert "Traceback" not in out and "smoke" not in out, out[-3000:]
    assert (result.returncode != 0) == stops, out[-3000:]
    if stops:
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    return out


def test_train_names_the_unusable_gpu(stand_in_gpu):
    """The default recipe (a 4-bit model) stops before anything is fetched."""
    check_named(run_script("train_unsloth.py", "--output_dir", "/nonexistent/never-written", check=False,
                           env=stand_in_gpu | {"HF_HUB_OFFLINE": "1"}), stops=True)


def test_train_with_an_explicit_gpu_backend_names_it(stand_in_gpu, tiny_model):
    check_named(run_script("train_unsloth.py", "--backend", "unsloth", "--model_name", str(tiny_model), check=False,
                           env=stand_in_gpu), stops=True)


@pytest.fixture(scope="module")
def untrained_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model, straight from PEFT (inference needs no training to run)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora.config import Config
    from qlora.model import _lora_config

    target = tmp_path_factory.mktemp("adapter") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), _lora_config(Config(lora_r=4)))
    model.save_pretrained(target)
    fixtures.save_tokenizer(target)
    return target


def test_infer_names_the_unusable_gpu_and_answers_on_the_cpu(stand_in_gpu, untrained_adapter):
    out = check_named(run_script("infer.py", str(untrained_adapter), "--prompt", "Hi", "--max_new_tokens", "2",
                                 check=False, env=stand_in_gpu), stops=False)
    assert "answering on the CPU" in out


def test_export_of_a_4bit_base_names_the_unusable_gpu(stand_in_gpu, untrained_adapter, tmp_path):
    """Dequantizing a 4-bit base needs the GPU: stopped before the base is fetched."""
    adapter = tmp_path / "adapter"
    subprocess.run(["cp", "-r", str(untrained_adapter), str(adapter)], check=True)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(settings | {"base_model_name_or_path":
                                                                          "example/tiny-bnb-4bit"}))
    check_named(run_script("export_gguf.py", "--adapter_dir", str(adapter), "--export_dir", str(tmp_path / "out"),
                           check=False, env=stand_in_gpu | {"HF_HUB_OFFLINE": "1"}), stops=True)
    assert not (tmp_path / "out" / "merged").exists()


def test_env_reports_driver_build_and_fit(stand_in_gpu):
    result = subprocess.run([sys.executable, "-m", "qlora", "env"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **stand_in_gpu}, timeout=600)
    out = check_named(result, stops=False)
    assert "- NVIDIA driver: Tesla T4, driver 550.54.15 (CUDA 12.4)" in out
    assert "- torch CUDA build: none (a CPU build) (torch 2.1" in out
    assert "- driver and torch fit: no: this machine has an" in out


def test_the_install_names_no_gpu_in_one_line(tmp_path):
    """No NVIDIA GPU (no nvidia-smi on PATH, no kernel module here): one line, exit 2, nothing installed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    if gpu.PROC_VERSION.exists():
        pytest.skip("this machine has an NVIDIA kernel module")
    result = subprocess.run(["sh", "scripts/install_gpu.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 2 and lines[-1] == gpu_install_smoke_line(), result.stdout + result.stderr
    colab = subprocess.run(["sh", "scripts/install_gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                           env=env | {"COLAB_RELEASE_TAG": "release-colab-test"})
    assert colab.returncode == 2 and colab.stdout.strip().endswith("Runtime > Change runtime type > T4 GPU, then "
                                                                    "run this again")


def gpu_install_smoke_line() -> str:
    from qlora.gpu_install import SMOKE

    return SMOKE


# ---------------------------------------------------------------- a large model without a GPU

def test_a_7b_model_is_not_trained_on_the_cpu_by_default(tmp_path):
    """backend auto, no GPU at all, a 16-bit 7 B model (only its config.json here): refused before loading."""
    from transformers import MistralConfig

    if gpu.driver() is not None:
        pytest.skip("this machine has an NVIDIA GPU")

    folder = tmp_path / "mistral-7b"
    MistralConfig(**standins.MISTRAL_7B_V02_CONFIG).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    result = run_script("train_unsloth.py", "--model_name", str(folder), "--output_dir", str(tmp_path / "out"),
                        check=False, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1] == (f"error: {folder} has 7.2 B parameters, too many to train on the CPU (float32, days): this "
                         f"machine has no CUDA GPU; --backend cpu trains on the CPU anyway")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version,cuda,why", [
    ("2.11.0", "13.0", "torch 2.11.0 is built for CUDA 13.0, which needs driver 580.65.06 or newer"),  # the index's
    ("2.11.0+cpu", None, "torch 2.11.0+cpu is a CPU build")])
def test_why_torch_cannot_use_colabs_driver(version, cuda, why):
    assert gpu.why_unfit(version, cuda, gpu.Driver("550.54.15", (12, 4))) == why
