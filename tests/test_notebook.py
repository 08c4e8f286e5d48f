"""notebooks/colab.ipynb runs to the end on the CPU: its own cells, in order, with the parameters cell overridden for
the smoke preset the way papermill does it (a cell injected after the one tagged `parameters`)."""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT
from qlora.fixtures import SMOKE_PROMPTS as SMOKE_ANSWERS

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def stored():
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(notebook) -> int:
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell, tagged `parameters`, holds what a user changes"
    return tagged[0]


def test_stored_without_outputs():
    notebook = stored()
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_the_readme_links_this_notebook():
    """The README's Colab badge names the notebook (a path in this repository: its public URL is not known here)."""
    badge = re.search(r"\[!\[Open In Colab\]\([^)]+\)\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert badge and (ROOT / badge.group(1)).resolve() == NOTEBOOK.resolve()


@pytest.fixture(scope="module")
def executed(fixture_dir, tmp_path_factory):
    """The notebook run on the CPU on the smoke preset: no install (CI has the CPU stack), the bundled stand-ins."""
    out = tmp_path_factory.mktemp("notebook") / "run"
    notebook = stored()
    overrides = {"INSTALL": False, "CONFIG": "configs/smoke.yaml", "OUTPUT_DIR": str(out),
                 "PROMPTS": list(SMOKE_ANSWERS), "GGUF_TYPES": "q4_k_m"}
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()),
                                         metadata={"tags": ["injected-parameters"]})
    at = parameters_cell(notebook) + 1
    notebook.cells.insert(at, injected)
    with pytest.MonkeyPatch.context() as patch:
        # this interpreter's environment first on PATH, as in Colab, where the cells' `python` is the kernel's own
        patch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        NotebookClient(notebook, timeout=1200, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook, at, out


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_runs_its_own_cells_to_the_end(executed):
    notebook, at, out = executed
    ran = notebook.cells[:at] + notebook.cells[at + 1:]
    assert [c.source for c in ran] == [c.source for c in stored().cells]  # the cells a Colab user runs, unchanged
    code = [c for c in ran if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    for name in ("adapter_model.safetensors", "loss.png", "metrics.json", "export/model-f16.gguf",
                 "export/model-q4_k_m.gguf", "export/Modelfile"):
        assert (out / name).is_file(), name


def test_shows_the_loss_plot_inline(executed):
    notebook, _, _ = executed
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1


def test_the_adapter_and_the_gguf_answer_right(executed):
    """The chat step prints each prompt with the adapter's answer; the export step answers the first from the GGUF."""
    notebook, _, out = executed
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {a["prompt"]: a["answer"] for a in answers} == SMOKE_ANSWERS
    shown = "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code")
    for prompt, answer in SMOKE_ANSWERS.items():
        assert f"> {prompt}\n{answer}\n" in shown
    export_cell = next(c for c in notebook.cells if "export_gguf.py" in c.source and c.cell_type == "code")
    assert text_of(export_cell).rstrip().endswith(next(iter(SMOKE_ANSWERS.values())))


def test_the_install_cell_without_a_gpu_ends_with_how_to_attach_one(tmp_path):
    """INSTALL on a Colab runtime with no GPU (this machine: no nvidia-smi, no NVIDIA kernel module): the install
    cell runs scripts/install_gpu.sh, installs nothing, and its output ends with the one line that says what to do."""
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    notebook = stored()
    install = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and "install_gpu.sh" in c.source)
    notebook.cells = notebook.cells[:install + 1]
    notebook.cells.insert(parameters_cell(notebook) + 1, nbformat.v4.new_code_cell("INSTALL = True"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]))
        patch.setenv("COLAB_RELEASE_TAG", "release-colab-test")  # what Colab's runtime sets
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    shown = text_of(notebook.cells[-1]).strip().splitlines()
    assert shown[-1] == ("no GPU is attached to this Colab runtime: Runtime > Change runtime type > T4 GPU, then run "
                         "this again")
    assert not any("pip install" in line for line in shown)
