"""The four scripts as a new user meets them: --help, and one-line errors for a model or data set that cannot be had."""

import ast

import pytest

from conftest import ROOT, run_script

SCRIPTS = ["data_prep.py", "train_unsloth.py", "infer.py", "export_gguf.py"]


def usage_examples(script: str) -> list[str]:
    """The indented command lines of the script's docstring, which --help shows as its description."""
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False)
    return [line for line in doc.splitlines() if line.startswith("    ") and line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_keeps_the_examples_lines(script):
    result = run_script(script, "--help", timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "Traceback" not in result.stderr
    shown = result.stdout.splitlines()
    examples = usage_examples(script)
    assert examples, f"{script}'s docstring should show how to run it"
    for line in examples:  # each example on its own line, as written (argparse's default would refill them)
        assert line in shown, line
