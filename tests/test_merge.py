"""The streaming merge (qlora/merge.py) against PEFT's own merge_and_unload, on the tiny model saved as several shards,
with random LoRA weights (so that every target moves): plain LoRA, and rsLoRA with a per-module alpha and a module
trained in full. Plus what it refuses in one line: DoRA, a value float16 cannot hold, a full disk."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from qlora import merge
from qlora.config import LORA_TARGETS

SETTINGS = {"plain": {},
            "rslora": {"use_rslora": True, "alpha_pattern": {"v_proj": 64}, "modules_to_save": ["lm_head"]}}


@pytest.fixture(scope="module")
def sharded_base(tiny_model, tmp_path_factory):
    """The tiny model (bf16) saved in shards of at most 4 MB, with its tokenizer and generation config."""
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("sharded") / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.save_pretrained(target, max_shard_size="4MB")
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith(("model", "config")):
            shutil.copyfile(f, target / f.name)
    assert len(list(target.glob("model-*.safetensors"))) >= 3
    return target


def random_adapter(base, target, **settings):
    """A LoRA of r 8 on every projection, B and A both random (PEFT's init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM",
                      **settings)
    peft_model = get_peft_model(model, lora)
    if "modules_to_save" in settings:
        with torch.no_grad():  # a trained-in-full module: its own values, not the base's
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(target)
    return peft_model


@pytest.mark.parametrize("kind", SETTINGS)
def test_streaming_merge_equals_peft_merge_and_unload(kind, sharded_base, tmp_path):
    import torch
    from safetensors.torch import load_file

    peft_model = random_adapter(sharded_base, tmp_path / "adapter", **SETTINGS[kind])
    want = {k: v.to(torch.float16) for k, v in peft_model.merge_and_unload().state_dict().items()}
    (tmp_path / "merged").mkdir()
    merge.merge_into(tmp_path / "adapter", sharded_base, tmp_path / "merged")
    assert [f.name for f in (tmp_path / "merged").glob("*.safetensors")] == [merge.SINGLE]  # one shard: no index
    got = load_file(tmp_path / "merged" / merge.SINGLE)
    assert got.keys() == want.keys() and all(t.dtype == torch.float16 for t in got.values())
    base = {}
    for shard in sharded_base.glob("model-*.safetensors"):
        base |= load_file(shard)
    for name, tensor in want.items():
        # float16 rounding of the same float32 sum: equal, or one unit in the last place apart
        torch.testing.assert_close(got[name], tensor, rtol=2**-10, atol=2**-24, msg=name)
    moved = [n for n in want if not torch.equal(got[n], base[n].to(torch.float16))]
    assert len(moved) == 7 * 2 + (1 if kind == "rslora" else 0), moved  # every target, and lm_head when trained
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config


def test_merged_folder_loads_in_transformers_in_several_shards(sharded_base, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    peft_model = random_adapter(sharded_base, tmp_path / "adapter")
    monkeypatch.setattr(merge, "SHARD_BYTES", 3 * 2**20)
    (tmp_path / "merged").mkdir()
    merge.merge_into(tmp_path / "adapter", sharded_base, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / merge.INDEX).read_text())
    shards = sorted(f.name for f in (tmp_path / "merged").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    ids = torch.tensor([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        want = peft_model.merge_and_unload()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits
    assert torch.allclose(got, want, atol=2e-2, rtol=5e-3), (got - want).abs().max()


def test_dora_is_refused_in_one_line(sharded_base, tmp_path):
    random_adapter(sharded_base, tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(settings | {"use_dora": True}))
    with pytest.raises(merge.MergeError, match=r"adapter_config.json: use_dora is set") as err:
        merge.merge_into(tmp_path / "adapter", sharded_base, tmp_path)
    assert "\n" not in str(err.value)


def test_a_value_float16_cannot_hold_is_refused(sharded_base, tmp_path):
    """bfloat16 holds values up to 3e38; float16 only up to 65504, beyond which the merged model would hold inf."""
    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = 2.0**20  # exact in bfloat16
    save_file(tensors, shard, metadata={"format": "pt"})
    random_adapter(sharded_base, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    with pytest.raises(merge.MergeError, match=rf"{name} holds 1.049e\+06, beyond float16's 65504"):
        merge.merge_into(tmp_path / "adapter", base, tmp_path / "merged")
    assert torch.finfo(torch.float16).max == merge.FLOAT16_MAX


CHILD_MERGE = """
import sys
from pathlib import Path
from qlora import merge
try:
    merge.merge_into(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
except merge.MergeError as err:
    sys.exit(f"error: {err}")
"""


def test_a_full_disk_during_the_merge_is_one_line(sharded_base, tmp_path):
    """A write the file system refuses (here: files over 1 MB, RLIMIT_FSIZE, as a full disk refuses any) ends in one
    line naming the shard, not a traceback."""
    random_adapter(sharded_base, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    result = subprocess.run([sys.executable, "-c", CHILD_MERGE, str(tmp_path / "adapter"), str(sharded_base),
                             str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=small_files, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'merged'}/model.safetensors: cannot write the merged "
                           f"model (File too large)"), line
