"""Export end to end on the tiny model's smoke fine-tune (conftest's trained_adapter): adapter -> merged 16-bit ->
GGUF f16, q8_0, q4_k_m -> llama.cpp, checked against the merged Hugging Face model; the adapter alone (--lora_only) ->
adapter.gguf on the base's GGUF in llama.cpp; the Ollama template rendered by Go's text/template; a killed, failed or
finished re-export into a good export folder; llama.cpp dying in a check.

Needs llama.cpp's converter (`sh scripts/get_llama_cpp_converter.sh`); the template test needs `go` (golang-go).
"""

import itertools
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import standins
from conftest import ROOT, one_line_error, run_script
from qlora import atomic, export, export_job, export_report, gguf_check, gguf_convert, isolate, modelfile, runtimes
from qlora.chat import Message
from qlora.config import Config
from qlora.data import read_records, to_conversation

TYPES = ["f16", "q8_0", "q4_k_m"]
SYSTEM = "You are a careful assistant. Answer briefly."


@pytest.fixture(scope="module")
def conversations(sample_data) -> list:
    """Finished conversations from the training data (single- and multi-turn), each also with a system message."""
    rows = [to_conversation(record, "auto", where) for where, record in itertools.islice(read_records(sample_data), 40)]
    multi = [c for c in rows if len(c) > 2][:2]
    chosen = rows[:3] + multi
    assert multi, "the sample set should hold multi-turn rows"
    return chosen + [[Message("system", SYSTEM)] + c for c in chosen]


@pytest.fixture(scope="module")
def sample_prompts(conversations) -> list:
    """Prompts from the training distribution: each conversation cut before its last answer."""
    return [c[:-1] for c in conversations[:3]]


@pytest.fixture(scope="module")
def exported(trained_adapter, tmp_path_factory, sample_prompts):
    """One full export (f16, q8_0, q4_k_m) checked on the training-distribution prompts and on the generic ones."""
    config = Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path_factory.mktemp("export")),
                    gguf_types=TYPES, system_prompt=SYSTEM)
    plan = export.run_export(config, prompts=sample_prompts + gguf_check.CHECK_PROMPTS)
    report = json.loads((plan.export_dir / "export_report.json").read_text())
    return plan, report


# ---------------------------------------------------------------- merge


def test_merged_folder_is_complete_and_equals_adapter_on_base(exported, trained_adapter, prompt_format):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.model import load_with_adapter

    plan, _ = exported
    merged = plan.merged_dir
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json"):
        assert (merged / name).is_file(), name
    assert (merged / "tokenizer.model").read_bytes() == (trained_adapter / "tokenizer.model").read_bytes()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float16"
    ids = torch.tensor([prompt_format.prompt_ids(gguf_check.CHECK_PROMPTS[0])])
    with torch.no_grad():
        want = load_with_adapter(trained_adapter, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    # float16 weights: about 3 significant digits, so the bound grows with the logits (up to about 14 here)
    assert torch.allclose(got, want, atol=2e-2, rtol=5e-3), (got - want).abs().max()


def test_known_4bit_bases_map_to_their_16bit_original(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "unsloth/mistral-7b-instruct-v0.2-bnb-4bit"}))
    base, dequantize, note = export_job.resolve_base(tmp_path, None)
    assert (base, dequantize) == ("mistralai/Mistral-7B-Instruct-v0.2", False) and "16-bit original" in note
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/model-bnb-4bit"}))
    base, dequantize, note = export_job.resolve_base(tmp_path, None)
    assert (base, dequantize) == ("someone/model-bnb-4bit", True) and "dequantizing" in note
    assert export_job.resolve_base(tmp_path, "my/16bit")[:2] == ("my/16bit", False)


def test_merged_only(trained_adapter, tmp_path):
    export.run_export(Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path / "m"), merged_only=True))
    assert (tmp_path / "m/merged/model.safetensors").is_file() and not list((tmp_path / "m").glob("*.gguf"))


# ---------------------------------------------------------------- GGUF files


def test_every_gguf_loads_with_tokenizer_and_chat_template(exported, prompt_format):
    """The GGUF carries the template written for llama.cpp's tokenizer, the merged folder the one written for
    transformers' (which adds no space after <s> and </s>): both render the training ids (tests/test_runtimes.py)."""
    from gguf import GGUFReader

    plan, _ = exported
    template = prompt_format.chat_template(space_after_special=False)
    assert (plan.merged_dir / "chat_template.jinja").read_text() == prompt_format.chat_template(True) != template
    for gguf_type in TYPES:
        fields = GGUFReader(plan.gguf(gguf_type)).fields
        assert fields["tokenizer.ggml.model"].contents() == "llama"
        assert len(fields["tokenizer.ggml.tokens"].contents()) == 32000
        assert fields["tokenizer.ggml.add_bos_token"].contents() is True
        assert fields["tokenizer.chat_template"].contents() == template


def test_f16_matches_merged_model(exported, sample_prompts):
    _, report = exported
    f16 = report["files"][0]
    assert f16["type"] == "f16" and not f16["problems"]
    for m in f16["prompts"]:
        assert m["cosine"] >= gguf_check.MIN_COSINE and gguf_check.f16_failure(m) is None
    for m in f16["prompts"][: len(sample_prompts)]:  # the training distribution: no near-ties, identical tokens
        assert m["split"] is None and m["agreement"] == 1.0, m


def test_an_f16_file_larger_than_the_ram_is_checked_by_its_tensors(exported, sample_prompts, prompt_format):
    """With RAM for q8_0 but not for f16 (a 7 B export in Colab's 12.7 GB), llama.cpp runs q8_0 alone; the f16 file's
    every tensor is found equal to the merged model's as the converter writes it (q and k rows permuted, 4 heads and
    2 KV heads here), and its tokenizer and metadata are still read by llama.cpp."""
    from qlora.merge import tensor_names

    plan, _ = exported
    f16, q8 = plan.gguf("f16"), plan.gguf("q8_0")
    prompts = gguf_check.prompt_set(prompt_format, sample_prompts)
    room = q8.stat().st_size + gguf_check.RUN_MARGIN + 2**20
    assert f16.stat().st_size + gguf_check.RUN_MARGIN > room
    checked = gguf_check.check_all(plan.merged_dir, {"f16": (f16, None), "q8_0": (q8, None)}, prompts, ram_bytes=room)
    tensors = len(tensor_names(plan.merged_dir / "model.safetensors"))
    assert checked["f16"]["checked_by"] == "tensors" and "prompts" not in checked["f16"]
    assert checked["f16"]["tensors"] == {"compared": tensors, "faults": {}} and checked["f16"]["tokenizer_ok"]
    assert "does not fit in the" in checked["f16"]["llama_cpp"] and "prompts" in checked["q8_0"]
    entry = gguf_check.check_file(f16, "f16", checked["f16"], prompt_format.chat_template(space_after_special=False),
                                  "llama")
    assert entry["problems"] == [] and entry["metadata"]["chat_template_ok"]
    assert f"ok: its {tensors} tensors are the merged model's" in export_report.table({"files": [entry]})


def test_the_tensor_check_names_a_changed_value_and_a_wrong_rotary_order(exported, tmp_path):
    from gguf import GGUFReader

    plan, _ = exported
    changed = tmp_path / "changed.gguf"
    shutil.copy(plan.gguf("f16"), changed)
    tensors = {t.name: t for t in GGUFReader(changed).tensors}
    value, q = tensors["output_norm.weight"], tensors["blk.0.attn_q.weight"]
    with open(changed, "r+b") as f:
        f.seek(value.data_offset)
        f.write(b"\0\0\0\0")  # one float32 scale set to 0
        f.seek(q.data_offset)  # layer 0's q rows as Hugging Face orders them, not llama.cpp
        f.write(gguf_check.read_tensor(plan.merged_dir / "model.safetensors",
                                         "model.layers.0.self_attn.q_proj.weight").tobytes())
    faults = gguf_check.tensor_check(changed, plan.merged_dir)["faults"]
    assert set(faults) == {"output_norm.weight", "blk.0.attn_q.weight"}, faults
    assert faults["output_norm.weight"].startswith("1 of 256 values differ"), faults


def test_quantized_files_are_reported(exported, capsys):
    _, report = exported
    assert [f["type"] for f in report["files"]] == TYPES
    for f in report["files"][1:]:
        assert not f["problems"] and f["tokenizer_ok"]
        assert all(0 <= m["agreement"] <= 1 and m["cosine"] > 0.5 for m in f["prompts"])
    table = export_report.table(report)
    assert all(f"model-{t}.gguf" in table for t in TYPES)


def test_quantized_files_answer_the_smoke_prompts_right(exported):
    """q8_0 and q4_k_m keep what the smoke fine-tune learned (scripts/smoke.sh asks the q4_k_m file)."""
    from qlora import fixtures, infer

    plan, _ = exported
    asked = [infer.conversation(prompt, None) for prompt in fixtures.SMOKE_PROMPTS]
    for gguf_type in TYPES[1:]:
        session = infer.open_session(plan.gguf(gguf_type), Config(temperature=0.0, max_new_tokens=32), "mistral")
        assert session.answers(asked, batch_size=1) == list(fixtures.SMOKE_PROMPTS.values()), gguf_type


def test_llama_cpp_tokenizer_gives_mistral_ids(exported, conversations, prompt_format):
    import llama_cpp

    plan, _ = exported
    for gguf_type in TYPES:
        llm = llama_cpp.Llama(str(plan.gguf(gguf_type)), vocab_only=True, verbose=False)
        for conversation in conversations + gguf_check.CHECK_PROMPTS:
            want = prompt_format.encode(conversation)[0]
            text = gguf_check.ollama_text(prompt_format, conversation)
            assert gguf_check.llama_cpp_tokenize(llm, text) == want, conversation


# ---------------------------------------------------------------- the adapter alone (--lora_only)

TINY_OLLAMA_BASE = "tiny-mistral:f16"  # as a user would name the tiny base in Ollama


@pytest.fixture(scope="module")
def lora_exported(trained_adapter, tmp_path_factory, sample_prompts):
    """export --lora_only --convert_base: adapter.gguf, checked in llama.cpp on the tiny base's f16 GGUF."""
    config = Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path_factory.mktemp("lora")), lora_only=True,
                    convert_base=True, ollama_base=TINY_OLLAMA_BASE, system_prompt=SYSTEM)
    plan = export.run_export(config, prompts=sample_prompts + gguf_check.CHECK_PROMPTS)
    return plan, json.loads((plan.export_dir / "export_report.json").read_text())


def test_lora_only_writes_adapter_gguf_and_a_modelfile_with_adapter(lora_exported, exported, trained_adapter,
                                                                     prompt_format):
    from gguf import GGUFReader
    from safetensors import safe_open

    plan, _ = lora_exported
    assert sorted(p.name for p in plan.export_dir.iterdir()) == [  # no merged/ and no model-*.gguf: nothing merged
        "Modelfile", "README.md", "adapter", "adapter.gguf", "base-f16.gguf", "chat_template.jinja", "config.yaml",
        "export_report.json", "llama.cpp.log", "loss.png"]
    llama_cpp_template = prompt_format.chat_template(space_after_special=False)
    assert (plan.export_dir / "chat_template.jinja").read_text() == llama_cpp_template  # for --chat-template-file
    assert GGUFReader(plan.base_gguf_file).fields["tokenizer.chat_template"].contents() == llama_cpp_template
    text = (plan.export_dir / "Modelfile").read_text()
    note = modelfile.ADAPTER_NOTE.format(adapter="adapter.gguf")
    assert text.startswith(f"{note}\nFROM {TINY_OLLAMA_BASE}\nADAPTER ./adapter.gguf\nTEMPLATE")
    assert "0.34.0 or older" in note and "ollama/ollama#14969" in note and "--lora adapter.gguf" in note
    full = (exported[0].export_dir / "Modelfile").read_text()
    instructions = text.removeprefix(note + "\n")
    assert instructions.split("\n", 2)[2] == full.split("\n", 1)[1], "TEMPLATE, stops and SYSTEM as in the full export"
    reader = GGUFReader(plan.adapter_gguf)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == json.loads(
        (trained_adapter / "adapter_config.json").read_text())["lora_alpha"]
    with safe_open(trained_adapter / "adapter_model.safetensors", "pt") as peft:
        assert len(reader.tensors) == len(list(peft.keys()))  # every lora_A and lora_B
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}


def test_adapter_on_the_f16_base_matches_the_merged_model(lora_exported, sample_prompts):
    _, report = lora_exported
    [entry] = report["files"]
    assert entry["file"] == "adapter.gguf" and entry["base_type"] == "MOSTLY_F16" and entry["strict"]
    assert not entry["problems"] and entry["tokenizer_ok"]
    for m in entry["prompts"]:
        assert m["cosine"] >= gguf_check.MIN_COSINE and gguf_check.f16_failure(m) is None
    for m in entry["prompts"][: len(sample_prompts)]:  # the training distribution: no near-ties, identical tokens
        assert m["split"] is None and m["agreement"] == 1.0, m


def test_llama_cpp_base_plus_adapter_gives_the_merged_f16_gguf(lora_exported, exported, conversations, prompt_format):
    """llama.cpp itself, both ways: the tiny base's f16 GGUF with adapter.gguf, and the merged f16 GGUF, on the
    training prompts (each conversation cut before its last answer)."""
    lora_plan, _ = lora_exported
    ids = [prompt_format.prompt_ids(c[:-1]) for c in conversations]
    n_ctx = max(map(len, ids)) + gguf_check.GREEDY_STEPS + 8
    merged = gguf_check.load_gguf(exported[0].gguf("f16"), n_ctx)
    with_adapter = gguf_check.load_gguf(lora_plan.export_dir / export_job.BASE_GGUF, n_ctx, lora=lora_plan.adapter_gguf)
    runs = [(gguf_check.gguf_run(merged, i), gguf_check.gguf_run(with_adapter, i)) for i in ids]
    cosines = [gguf_check.compare(want, got)["cosine"] for want, got in runs]
    print(f"base f16 + adapter.gguf vs merged f16 GGUF: {sum(len(w.tokens) for w, _ in runs)} greedy tokens on "
          f"{len(ids)} prompts, logits cosine >= {min(cosines):.6f}")
    assert [got.tokens for _, got in runs] == [want.tokens for want, _ in runs]
    assert min(cosines) >= gguf_check.MIN_COSINE


def test_infer_with_lora_answers_as_the_merged_gguf(lora_exported, exported, sample_data, tmp_path):
    """infer.py BASE.gguf --lora adapter.gguf gives what infer.py MERGED.gguf gives: the same answers to the training
    prompts (--input), and the same printed answer (--prompt)."""
    lora_plan, _ = lora_exported
    models = {"adapter": (str(lora_plan.export_dir / export_job.BASE_GGUF), "--lora", str(lora_plan.adapter_gguf)),
              "merged": (str(exported[0].gguf("f16")),)}
    greedy = ("--system", "", "--temperature", "0", "--max_new_tokens", "24")
    prompts = tmp_path / "prompts.jsonl"
    rows = [to_conversation(record, "auto", where) for where, record in itertools.islice(read_records(sample_data), 12)]
    prompts.write_text("".join(json.dumps({"prompt": c[0].content}) + "\n" for c in rows if len(c) == 2))
    answers = {}
    for name, model in models.items():
        run_script("infer.py", *model, "--input", str(prompts), "--output", str(tmp_path / name), *greedy)
        answers[name] = [json.loads(line)["answer"] for line in (tmp_path / name).read_text().splitlines()]
    assert answers["adapter"] == answers["merged"] and sum(map(bool, answers["merged"])) >= 2, answers
    prompt = json.loads(prompts.read_text().splitlines()[[bool(a) for a in answers["merged"]].index(True)])["prompt"]
    printed = {name: run_script("infer.py", *model, "--prompt", prompt, *greedy).stdout
               for name, model in models.items()}
    assert printed["adapter"] == printed["merged"] and printed["merged"].strip()


def test_adapter_on_a_quantized_base_is_reported(lora_exported, trained_adapter, tmp_path):
    base = tmp_path / "base-q4_k_m.gguf"
    gguf_convert.quantize(lora_exported[0].export_dir / export_job.BASE_GGUF, base, "q4_k_m")
    out = tmp_path / "e"
    export.run_export(Config(adapter_dir=str(trained_adapter), export_dir=str(out), lora_only=True,
                             base_gguf=str(base), ollama_base=str(base)))
    [entry] = json.loads((out / "export_report.json").read_text())["files"]
    assert entry["base_type"] == "MOSTLY_Q4_K_M" and not entry["strict"] and not entry["problems"]
    # q4_k_m moves a 256-wide model's logits: one smoke prompt is at 0.977 on an AMD EPYC (0.997 for the others);
    # without the adapter the fine-tune's logits are far off (eval loss 13.3 before training, 0.03 after)
    assert all(0.95 < m["cosine"] < 1 for m in entry["prompts"]), entry["prompts"]
    assert f"\nFROM {base.resolve()}\nADAPTER ./adapter.gguf\n" in (out / "Modelfile").read_text()


def test_lora_only_reads_no_base_weights(lora_exported, trained_adapter, tiny_model, tmp_path):
    """export_gguf.py --lora_only with a base folder holding config.json alone gives the same adapter.gguf tensors,
    unchecked (no base GGUF)."""
    from gguf import GGUFReader

    (tmp_path / "base").mkdir()
    shutil.copyfile(tiny_model / "config.json", tmp_path / "base" / "config.json")
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "base")
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    result = run_script("export_gguf.py", "--adapter_dir", str(adapter), "--lora_only", "--ollama_base", "tiny")
    assert "not checked: no base GGUF" in result.stdout
    got, want = (GGUFReader(p).tensors for p in (adapter / "export/adapter.gguf", lora_exported[0].adapter_gguf))
    assert [(t.name, t.data.tobytes()) for t in got] == [(t.name, t.data.tobytes()) for t in want]


def whole_adapter_file(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, folder / "adapter_model.safetensors")


def test_adapter_route_settings(tmp_path):
    def plan(base: str, **settings):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base} | settings))
        whole_adapter_file(tmp_path)  # planning checks the adapter's file and never reads the base
        return lambda **flags: export_job.job_for(Config(adapter_dir=str(tmp_path), **flags))

    default = plan("unsloth/mistral-7b-instruct-v0.2-bnb-4bit")(lora_only=True)
    assert (default.ollama_base, default.base_gguf) == ("mistral:7b-instruct-v0.2", None)
    with pytest.raises(export_job.ExportError, match=r"^--ollama_base: no Ollama model known for the base some/model;"):
        plan("some/model")(lora_only=True)
    with pytest.raises(export_job.ExportError, match="--base_gguf nope.gguf: no such file"):
        plan("some/model")(lora_only=True, ollama_base="m", base_gguf="nope.gguf")
    with pytest.raises(export_job.ExportError, match="exclude each other"):
        plan("some/model")(lora_only=True, ollama_base="m", base_gguf=__file__, convert_base=True)
    with pytest.raises(export_job.ExportError, match="go with --lora_only"):
        plan("some/model")(ollama_base="m")
    with pytest.raises(export_job.ExportError, match="DoRA cannot be expressed as llama.cpp's LoRA"):
        plan("some/model", use_dora=True)(lora_only=True, ollama_base="m")
    plan("some/model")
    result = run_script("export_gguf.py", "--adapter_dir", str(tmp_path), "--lora_only", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: --ollama_base: ")
    assert "Traceback" not in result.stderr


def test_convert_base_of_a_local_base_writes_the_modelfile_from_the_converted_file(tmp_path, tiny_model):
    """--lora_only --convert_base on a base no Ollama model is known for: FROM the base GGUF the export writes beside
    the Modelfile, whether --ollama_base is left out or names that file before it exists."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    whole_adapter_file(adapter)

    def plan(**flags):
        return export_job.job_for(Config(adapter_dir=str(adapter), lora_only=True, convert_base=True, **flags))

    assert plan().ollama_base == "./base-f16.gguf"
    assert plan(ollama_base=str(adapter / "export" / "base-f16.gguf")).ollama_base == "./base-f16.gguf"
    assert plan(ollama_base="my-base:f16").ollama_base == "my-base:f16"
    with pytest.raises(export_job.ExportError, match=r"--ollama_base elsewhere.gguf: no such file"):
        plan(ollama_base="elsewhere.gguf")


# ---------------------------------------------------------------- Ollama


@pytest.mark.skipif(shutil.which("go") is None,
                    reason="needs Go to run Ollama's template engine (apt-get install golang-go)")
def test_ollama_template_renders_the_training_text(conversations, prompt_format, tmp_path):
    """Ollama renders the TEMPLATE, then puts <s> before it: the result must be the training text exactly, for
    prompts (ending with a user turn) and for whole conversations, with and without a system message."""
    shapes = conversations + [c[:-1] for c in conversations]
    for legacy in (False, True):
        rendered = runtimes.ollama_render(modelfile.OLLAMA_TEMPLATE, None, shapes, tmp_path, legacy=legacy)
        for conversation, text in zip(shapes, rendered, strict=True):
            assert "<s>" + text == gguf_check.rendered_text(prompt_format, conversation), (legacy, conversation)


def test_modelfile(exported):
    plan, _ = exported
    text = (plan.export_dir / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q4_k_m.gguf\n") and (plan.export_dir / "model-q4_k_m.gguf").is_file()
    assert f'TEMPLATE """{modelfile.OLLAMA_TEMPLATE}"""' in text
    assert 'PARAMETER stop "[INST]"\nPARAMETER stop "</s>"\n' in text and f'SYSTEM """{SYSTEM}"""' in text
    assert "SYSTEM" not in modelfile.modelfile("model-f16.gguf", None)


def test_modelfile_system_defaults_to_the_training_runs(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "any"}))
    whole_adapter_file(tmp_path)
    (tmp_path / "config.yaml").write_text("system_prompt: Be terse.\n")
    assert export_job.job_for(Config(adapter_dir=str(tmp_path), base_model_16bit="b")).system_prompt == "Be terse."
    assert export_job.job_for(Config(adapter_dir=str(tmp_path), base_model_16bit="b",
                                     system_prompt="S")).system_prompt == "S"


def test_rendered_text_spells_out_mistral_v1(prompt_format):
    conversation = [Message("system", "S"), Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2")]
    assert gguf_check.rendered_text(prompt_format, conversation) == "<s>[INST] S\n\nU1 [/INST] A1</s>[INST] U2 [/INST]"


# ---------------------------------------------------------------- failures and atomic writes


def test_disk_space_is_checked_before_any_work(trained_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    with pytest.raises(export_job.ExportError, match=r"GiB needed for merged, model-f16.gguf.* but only 0.0 GiB free"):
        export.run_export(Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path / "e"), gguf_types=TYPES))
    assert not list((tmp_path / "e").iterdir())


def test_missing_converter_is_one_line_naming_the_command(trained_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(gguf_convert.CONVERTER_ENV, str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["export_gguf.py", "--adapter_dir", str(trained_adapter),
                                      "--export_dir", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "export_gguf.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert (message.startswith(f"error: {tmp_path}") and gguf_convert.INSTALL_CONVERTER in message
            and "\n" not in message)


REAL_LLAMA_CPP_FACTS = gguf_check.llama_cpp_facts


def llama_cpp_dies_on_q8_0(path, *args):
    """llama.cpp as it dies on a CPU it was not built for (SIGILL), here when it evaluates the q8_0 file. It runs in
    the check's child process, which finds it by importing this module."""
    if Path(path).name == "model-q8_0.gguf":
        os.kill(os.getpid(), signal.SIGILL)
    return REAL_LLAMA_CPP_FACTS(path, *args)


def test_llama_cpp_crash_in_a_check_is_one_line_and_the_files_stay(trained_adapter, tmp_path, monkeypatch):
    """export_gguf.py when llama.cpp is killed by SIGILL checking one file: every GGUF stays, the report marks that
    file unchecked with the signal, the files after it are still checked, and the script ends with one line."""
    monkeypatch.setattr(gguf_check, "llama_cpp_facts", llama_cpp_dies_on_q8_0)
    out = tmp_path / "e"
    monkeypatch.setattr(sys, "argv", ["export_gguf.py", "--adapter_dir", str(trained_adapter), "--export_dir",
                                      str(out), "--gguf_types", *TYPES])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "export_gguf.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("error: llama.cpp's check of model-q8_0.gguf was killed by SIGILL: ")
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith(f"`{isolate.REBUILD_LLAMA_CPP}`") and "f16.gguf" not in message
    assert all((out / f"model-{t}.gguf").stat().st_size > 2**20 for t in TYPES) and (out / "Modelfile").is_file()
    files = {f["type"]: f for f in json.loads((out / "export_report.json").read_text())["files"]}
    assert files["q8_0"]["signal"] == "SIGILL" and "prompts" not in files["q8_0"]
    assert files["f16"]["prompts"] and not files["f16"]["problems"]
    assert files["q4_k_m"]["prompts"] and files["q4_k_m"]["tokenizer_ok"]  # checked after the crash


def test_bad_settings_fail_before_work(trained_adapter, tmp_path):
    with pytest.raises(export_job.ExportError, match="unknown type.*q9_z"):
        export.run_export(Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path), gguf_types=["q9_z"]))
    with pytest.raises(export_job.ExportError, match="exclude each other"):
        export.run_export(Config(adapter_dir=str(trained_adapter), merged_only=True, lora_only=True))
    with pytest.raises(export_job.ExportError, match="no adapter_config.json"):
        export.run_export(Config(adapter_dir=str(tmp_path)))


def test_an_adapter_trained_on_the_instruction_template_gets_no_inst_modelfile(trained_adapter, tmp_path):
    """GGUF files and the Modelfile speak Mistral's [INST] prompt: an adapter trained on another prompt is refused
    there (the merged folder alone is still written)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained_adapter / name, adapter)
    trained = (trained_adapter / "config.yaml").read_text()
    (adapter / "config.yaml").write_text(trained.replace("template: mistral", "template: instruction"))
    with pytest.raises(export_job.ExportError, match="trained with template: instruction.*--merged_only"):
        export_job.job_for(Config(adapter_dir=str(adapter)))
    assert export_job.job_for(Config(adapter_dir=str(adapter), merged_only=True)).gguf_types == []


@pytest.fixture
def old_export(exported, trained_adapter, tmp_path):
    """A good export folder (a copy of the full export, with a file of the user's in it) and a second adapter (the
    same weights in another folder: another adapter_dir in the report) to re-export into it."""
    plan, _ = exported
    out = tmp_path / "export"
    shutil.copytree(plan.export_dir, out)
    (out / "notes.txt").write_text("the user's own file\n")
    other = tmp_path / "other-adapter"
    shutil.copytree(trained_adapter, other, ignore=shutil.ignore_patterns("checkpoint-*"))
    return out, other, snapshot(out)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.stat().st_size < 2**16 else p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_whole_and_consistent(out: Path, adapter: Path) -> None:
    """The report vouches for `adapter`, and for files that are there; the Modelfile's FROM file exists."""
    report = json.loads((out / export_job.REPORT).read_text())
    assert report["adapter_dir"] == str(adapter)
    for f in report["files"]:
        assert (out / f["file"]).stat().st_size == f["bytes"], f["file"]
    source = (out / "Modelfile").read_text().splitlines()[0].removeprefix("FROM ")
    assert (out / source).is_file(), source


@pytest.mark.parametrize("stage", ["merged", "model-f16.gguf", "model-q8_0.gguf"])
def test_a_killed_reexport_leaves_the_old_export_whole(stage, old_export, trained_adapter):
    """SIGKILL a re-export of another adapter into a good export folder (converter included) while it writes `stage`
    (the merge, the f16 conversion, the quantization): the old export is exactly as it was, its report still true."""
    out, other, before = old_export
    process = subprocess.Popen([sys.executable, "export_gguf.py", "--adapter_dir", str(other), "--export_dir",
                                str(out), "--gguf_types", "f16", "q8_0"], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    temporary = wait_for_writing(out.parent, f".{out.name}.tmp-*/.{stage}.tmp-", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert temporary.exists(), "the write finished before the kill; nothing was tested"
    assert snapshot(out) == before
    assert_whole_and_consistent(out, trained_adapter)
    atomic.remove_stale_temporaries(out.parent, prefix=f".{out.name}")
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_a_reexport_replaces_the_old_export_whole_and_keeps_the_users_files(old_export):
    """A finished re-export with fewer types: none of the old adapter's files stay (no model-q4_k_m.gguf), the report
    and Modelfile are the new ones, and the user's file is still there."""
    out, other, before = old_export
    run_script("export_gguf.py", "--adapter_dir", str(other), "--export_dir", str(out), "--gguf_types", "f16")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "config.yaml", "export_report.json",
                                                     "llama.cpp.log", "loss.png", "merged", "model-f16.gguf",
                                                     "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert_whole_and_consistent(out, other)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_full_disk_during_the_merge_keeps_the_old_export(old_export, trained_adapter):
    """The file system refuses the merged shard (files over 1 MB, RLIMIT_FSIZE, as a full disk refuses any write):
    one error line, the old export as it was, no staging folder left."""
    import resource

    out, other, before = old_export

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    result = subprocess.run([sys.executable, "export_gguf.py", "--adapter_dir", str(other), "--export_dir", str(out),
                             "--gguf_types", "f16"], cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cannot write the merged model (File too large)" in line, line
    assert line.endswith("the old export is as it was")
    assert snapshot(out) == before
    assert_whole_and_consistent(out, trained_adapter)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def wait_for_writing(folder: Path, pattern: str, process, timeout: float = 120) -> Path:
    """The temporary matching this pattern once it holds over 1 MiB: tensor data being written, not just a header."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = list(folder.glob(pattern + "*"))
        if found and size(found[0]) > 2**20:
            return found[0]
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no {pattern}* being written in {folder} (export exited {process.poll()})")


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size


def test_an_f16_parting_within_the_logits_own_difference_is_a_near_tie():
    """The 7.24 B stand-in's f16 file: first logits up to 0.027 off the float32 reference (llama.cpp's CPU kernels round
    activations to f16), and its greedy run parted at step 1 where the reference's top-2 margin was 0.014. Twice the
    difference covers that; a parting at a margin beyond it still fails, as does one before any near-tie."""
    import numpy as np

    logits = np.linspace(-5, 5, 32000, dtype=np.float32)
    off = logits + np.where(np.arange(32000) % 2, 0.027, -0.027).astype(np.float32)
    ref = gguf_check.Run([7, 8, 9], logits, [0.5, 0.014, 0.3])
    m = gguf_check.compare(ref, gguf_check.Run([7, 5, 6], off, []))
    assert m["split"] == 1 and m["near_tie_margin"] == pytest.approx(0.054, abs=1e-4)
    assert gguf_check.f16_failure(m) is None
    m = gguf_check.compare(gguf_check.Run([7, 8, 9], logits, [0.5, 0.07, 0.3]), gguf_check.Run([7, 5, 6], off, []))
    assert "greedy tokens part at step 1 with HF margin 0.0700 >= 0.0540" in gguf_check.f16_failure(m)
    exact = gguf_check.compare(gguf_check.Run([7, 8, 9], logits, [0.5, 0.014, 0.3]), gguf_check.Run([7, 5], logits, []))
    assert exact["near_tie_margin"] == gguf_check.NEAR_TIE and gguf_check.f16_failure(exact) is not None


# ---------------------------------------------------------------- what the export says


@pytest.fixture(scope="module")
def random_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model with random weights: the export's output does not depend on training."""
    return standins.save_random_adapter(tiny_model, tmp_path_factory.mktemp("random") / "adapter")


def test_the_export_ends_with_where_its_files_are_and_how_to_run_them(random_adapter, tmp_path):
    """llama.cpp's converter and quantizer talk into llama.cpp.log in the export folder; the export's own output is
    short and ends with the folder, each file's verdict and the llama.cpp, Ollama and infer.py commands."""
    out = tmp_path / "export"
    result = run_script("export_gguf.py", "--adapter_dir", str(random_adapter), "--export_dir", str(out),
                        "--gguf_types", "f16", "q4_k_m")
    said = result.stdout + result.stderr
    assert "INFO:hf-to-gguf" not in said and "llama_model_loader" not in said and "Unknown RoPE type" not in said
    assert len(result.stdout.splitlines()) < 40, result.stdout
    last = result.stdout.strip().split(f"done: the export is in {out}\n", 1)[1].splitlines()
    assert last[0].split()[0] == "model-f16.gguf" and "ok: agrees with the merged model" in last[0]
    assert last[1].split()[0] == "model-q4_k_m.gguf" and "greedy agreement" in last[1]
    assert any(line.strip().startswith("Modelfile") for line in last)
    assert f"llama-cli -m {out / 'model-q4_k_m.gguf'} -cnv --jinja" in result.stdout
    assert f"ollama create adapter -f {out / 'Modelfile'} && ollama run adapter" in result.stdout
    log = (out / "llama.cpp.log").read_text()
    assert "==== convert_hf_to_gguf.py -> model-f16.gguf" in log and "==== quantize model-f16.gguf -> " in log
    assert "INFO:hf-to-gguf" in log and "llama_model_loader" in log


def test_a_failing_converter_shows_the_end_of_its_output(random_adapter, tmp_path):
    """A converter that fails: the export stops in one line, after the last lines of the converter's output (the log
    goes with the failed export's staging folder), and nothing of the export is left."""
    converter = tmp_path / "converter"
    shutil.copytree(ROOT / ".llama.cpp" / "gguf-py", converter / "gguf-py")
    (converter / "convert_hf_to_gguf.py").write_text("import sys\nprint('reading the model')\n"
                                                     "sys.exit('ValueError: a tensor this converter cannot map')\n")
    out = tmp_path / "export"
    result = run_script("export_gguf.py", "--adapter_dir", str(random_adapter), "--export_dir", str(out),
                        "--gguf_types", "f16", check=False, env={"LLAMA_CPP_CONVERTER": str(converter)})
    one_line_error(result, "convert_hf_to_gguf.py failed (exit 1)", "the last 3 lines of its output are above")
    assert "  | ValueError: a tensor this converter cannot map" in result.stderr
    assert not list(out.glob("*")) and not list(tmp_path.glob(".export.tmp-*"))
