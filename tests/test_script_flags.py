"""Each script's flags are exactly the settings its code reads: `SCRIPTS` in qlora/config.py against the code.

What a script reads is found statically, nothing run: from the script's file, a walk follows every name the code
refers to into the qlora modules, one top-level function, class or constant at a time (a function or class reached
brings all of its body: nested functions, every method), and collects each `config.<field>` read and each
`getattr(config, "<field>")` (an f-string name stands for every field it can spell). What it offers is what its
parser has: `build_parser(script)`, for the script the file hands to `parse`. The test fails both ways: a setting read
but not offered (only a --config file could set it) and a flag offered but never read (it would do nothing).

Coarse where the code is: a function reached counts all its reads, whichever branch runs; a Config held under another
name than `config` is not seen (the package calls it `config` everywhere).
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from qlora import config as config_module
from qlora.config import FIELDS, build_parser

PACKAGE = ROOT / "qlora"
SCRIPTS = ["data_prep.py", "train_unsloth.py", "export_gguf.py", "infer.py"]


class Module:
    """One parsed file: its top-level definitions (function, class, constant) and the qlora names it imports."""

    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.name = path.stem
        self.units = {}  # top-level name -> the code it stands for
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.units[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in (n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
                    self.units[name.id] = node.value
        self.modules, self.imported = {}, {}  # local name -> qlora module; local name -> (qlora module, its name)
        for node in ast.walk(self.tree):  # imports inside functions too: the package imports heavy things late
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").split(".")[0] == "qlora"):
                source = (node.module or "").removeprefix("qlora").lstrip(".")
                for alias in node.names:
                    if source:
                        self.imported[alias.asname or alias.name] = (source, alias.name)
                    else:
                        self.modules[alias.asname or alias.name] = alias.name

    def references(self, node) -> set[tuple[str, str]]:
        """(module, top-level name) of each definition `node` refers to, here or in another qlora module."""
        found = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                if n.id in self.units:
                    found.add((self.name, n.id))
                elif n.id in self.imported:
                    found.add(self.imported[n.id])
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in self.modules:
                found.add((self.modules[n.value.id], n.attr))
        return found


def settings_read(node) -> set[str]:
    """The fields `node`'s code reads from a config: `config.name`, `getattr(config, "name")` or an f-string name."""
    found = set()
    for n in ast.walk(node):
        if (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and isinstance(n.value, ast.Name)
                and n.value.id == "config"):
            found.add(n.attr)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr" and len(n.args) > 1
              and isinstance(n.args[0], ast.Name) and n.args[0].id == "config"):
            key = n.args[1]
            if isinstance(key, ast.Constant):
                found.add(key.value)
            elif isinstance(key, ast.JoinedStr):
                spelled = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".*" for v in key.values)
                found |= {name for name in FIELDS if re.fullmatch(spelled, name)}
    return found & FIELDS.keys()


def reads(script: str) -> set[str]:
    """Every field the code that `script` can reach reads."""
    modules = {"": Module(ROOT / script)}

    def module(name: str) -> Module | None:
        if name not in modules:
            path = PACKAGE / f"{name}.py"
            modules[name] = Module(path) if path.is_file() else None
        return modules[name]

    found = settings_read(modules[""].tree)
    todo, seen = list(modules[""].references(modules[""].tree)), set()
    while todo:
        unit = todo.pop()
        if unit in seen:
            continue
        seen.add(unit)
        owner = module(unit[0])
        if owner is None or unit[1] not in owner.units:  # a module's name (`from . import x`), or not ours
            continue
        found |= settings_read(owner.units[unit[1]])
        todo += owner.references(owner.units[unit[1]])
    return found


def parsed_as(script: str) -> str:
    """The name the script hands to `parse` (DATA_PREP, TRAIN, ...): the flags it is given."""
    calls = [n for n in ast.walk(ast.parse((ROOT / script).read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "parse"]
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.Name), f"{script}: one parse(NAME, ...) call"
    return getattr(config_module, calls[0].args[0].id)


def offered(script: str) -> set[str]:
    parser = build_parser(parsed_as(script), "")
    return {action.dest for action in parser._actions} - {"help", "config"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_offers_exactly_the_settings_it_reads(script):
    read, flags = reads(script), offered(script)
    assert read, f"the walk found no settings read by {script}"
    assert read - flags == set(), f"{script} reads these but has no flag for them"
    assert flags - read == set(), f"{script} has these flags but never reads them"


def test_data_prep_help_offers_no_training_setting():
    shown = subprocess.run([sys.executable, "data_prep.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=120).stdout
    flags = set(re.findall(r"--\w+", shown))
    assert {"--dataset", "--model_name", "--output_dir"} <= flags
    assert flags.isdisjoint({"--learning_rate", "--resume", "--resume_from_checkpoint", "--lora_r"}), flags
