"""Shared test fixtures: the real Mistral tokenizers, the tiny models and the sample set, built once under fixtures/."""

from pathlib import Path

import pytest

from qlora import fixtures
from qlora.chat import PromptFormat, load_prompt_format

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return fixtures.build(ROOT / "fixtures")


@pytest.fixture(scope="session")
def tiny_model(fixture_dir) -> Path:
    return fixture_dir / fixtures.TINY_MODEL


@pytest.fixture(scope="session")
def tiny_v3(fixture_dir) -> Path:
    return fixtures.build(fixture_dir, [fixtures.TINY_V3]) / fixtures.TINY_V3


@pytest.fixture(scope="session")
def tiny_tekken(fixture_dir) -> Path:
    return fixtures.build(fixture_dir, [fixtures.TINY_TEKKEN]) / fixtures.TINY_TEKKEN


@pytest.fixture(scope="session")
def sample_data(fixture_dir) -> Path:
    return fixture_dir / fixtures.SAMPLE_DATA


@pytest.fixture(scope="session")
def prompt_format(tiny_model) -> PromptFormat:
    return load_prompt_format(tiny_model / "tokenizer.model")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is (`pytest -m gpu` on a GPU host)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_script(script: str, *args: str, timeout: int = 900, check: bool = True, env: dict | None = None):
    """Run one of the top-level scripts the way a user does (`env`: variables to add); returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def one_line_error(result, *parts: str) -> str:
    """The run failed with a single `error:` line (nothing else on stderr after it) holding every part."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for part in parts:
        assert part in last, last
    return last


def start_script(script: str, *args: str, log: Path):
    """Start one of the top-level scripts in the background, its output going to `log` (a pipe could fill up)."""
    import subprocess
    import sys

    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process, timeout: int = 600) -> None:
    """Poll until `path` exists; fail if the process ends first or the time runs out."""
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended before {path.name} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def load_adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="session")
def trained_adapter(fixture_dir, tmp_path_factory) -> Path:
    """A real smoke run of train_unsloth.py on the tiny model: adapter, tokenizer, checkpoints and reports."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--output_dir", str(out))
    return out


def renderers(tokenizer_file: str, fixture_dir: Path):
    """(our renderer, mistral-common's instruct tokenizer) of one of mistral-common's tokenizer files (a Tekken file
    is read by us as the tokenizer.json transformers' converter makes of it, as Nemo's checkouts ship it)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    source = fixtures.mistral_common_file(tokenizer_file)
    ours = source
    if source.name.endswith(".json"):
        folder = fixture_dir / "tokenizers" / source.stem
        if not (folder / "tokenizer.json").is_file():
            fixtures.save_tekken_tokenizer(source, folder)
        ours = folder / "tokenizer.json"
    return load_prompt_format(ours), MistralTokenizer.from_file(str(source)).instruct_tokenizer
