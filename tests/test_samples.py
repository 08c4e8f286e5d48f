"""Samples during training (qlora/samples.py): greedy answers to held-out prompts at the start and at each evaluation,
through train_unsloth.py on the tiny model, and the pieces that pick, render, take and publish them."""

import json
import re
import signal
import sys
import types

import pytest
import torch

from conftest import load_adapter, one_line_error, run_script, start_script, wait_for
from qlora.chat import Message, load_prompt_format
from qlora.config import Config
from qlora.data import DataError, prepare_rows
from qlora.samples import SAMPLES_STATE, WIDTH, Samples, from_eval_rows, read_prompts, rendered

# With LoRA dropout, so that training draws random numbers: a sample that drew some would change the adapter
SHORT = ["--config", "configs/smoke.yaml", "--max_steps", "12", "--save_steps", "4", "--eval_steps", "4",
         "--logging_steps", "1", "--token_budget", "1024", "--lora_dropout", "0.1", "--sample_max_new_tokens", "12"]
SAMPLE_LINE = re.compile(r"sample @ (\d+): ")


@pytest.fixture(scope="module")
def with_samples(fixture_dir, tmp_path_factory):
    """A short run with the default samples: 3 eval rows at the start and at steps 4, 8 and 12; (folder, stdout)."""
    out = tmp_path_factory.mktemp("samples") / "run"
    result = run_script("train_unsloth.py", *SHORT, "--output_dir", str(out))
    return out, result.stdout


def metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_samples_leave_the_adapter_as_a_run_without_them_trains_it(with_samples, tmp_path):
    out, _ = with_samples
    without = tmp_path / "without"
    run_script("train_unsloth.py", *SHORT, "--sample_count", "0", "--output_dir", str(without))
    a, b = load_adapter(out), load_adapter(without)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"the samples changed the adapter by {worst}"
    assert metrics(without)["samples"] == [] and not list(without.glob(f"checkpoint-*/{SAMPLES_STATE}"))


def test_a_sample_at_the_start_and_at_each_evaluation(with_samples):
    out, stdout = with_samples
    result = metrics(out)
    steps = [s["step"] for s in result["samples"]]
    assert steps == [e["step"] for e in result["eval_loss"]] == [0, 4, 8, 12]
    for sample in result["samples"]:
        assert len(sample["answers"]) == 3
        for answer in sample["answers"]:
            assert answer["prompt"] and "[INST]" not in answer["prompt"], answer
            assert isinstance(answer["answer"], str) and answer["reference"], answer
    # the same held-out rows each time, with their own answers as references (the sample set's facts)
    assert len({json.dumps([(a["prompt"], a["reference"]) for a in s["answers"]]) for s in result["samples"]}) == 1
    lines = [line for line in stdout.splitlines() if SAMPLE_LINE.search(line)]
    assert [int(SAMPLE_LINE.search(line)[1]) for line in lines] == [s for s in steps for _ in range(3)]
    assert all(len(line[SAMPLE_LINE.search(line).start():]) <= WIDTH for line in lines)
    # each checkpoint holds the samples taken up to it
    kept = json.loads((out / "checkpoint-8" / SAMPLES_STATE).read_text())
    assert kept == result["samples"][:3]


def test_the_smoke_run_samples_its_evaluations_and_learns_the_answers(trained_adapter):
    result = metrics(trained_adapter)
    assert [s["step"] for s in result["samples"]] == [e["step"] for e in result["eval_loss"]]
    assert result["samples"][0]["step"] == 0

    def right(sample):
        return sum(a["answer"] == a["reference"] for a in sample["answers"])

    assert right(result["samples"][0]) == 0 and right(result["samples"][-1]) >= 2, result["samples"][-1]


def test_killed_and_resumed_the_samples_before_the_kill_stay(with_samples, tmp_path):
    straight, _ = with_samples
    killed = tmp_path / "killed"
    process = start_script("train_unsloth.py", *SHORT, "--output_dir", str(killed), log=tmp_path / "killed.log")
    wait_for(killed / "checkpoint-4", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    resumed = run_script("train_unsloth.py", "--config", str(killed / "config.yaml"), "--resume")
    since = int(re.search(r"resuming from \S*checkpoint-(\d+)", resumed.stdout)[1])
    taken_again = {int(m[1]) for m in SAMPLE_LINE.finditer(resumed.stdout)}
    assert taken_again == {s for s in (4, 8, 12) if s > since}, resumed.stdout[-3000:]
    before, after = metrics(straight)["samples"], metrics(killed)["samples"]
    assert [s["step"] for s in after] == [0, 4, 8, 12]
    # those before the kill come from the checkpoint, as the run took them
    assert [s for s in after if s["step"] <= since] == [s for s in before if s["step"] <= since]


def test_prompts_from_a_text_file_without_an_eval_split(fixture_dir, tmp_path):
    """No eval split: a --sample_prompts file is answered at the start, every --eval_steps steps and at the end."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of Arvenia?\n\n  Count from 1 to 4.  \n")
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", *SHORT, "--max_steps", "5", "--eval_steps", "2", "--eval_fraction", "0",
                        "--sample_prompts", str(prompts), "--output_dir", str(out))
    samples = metrics(out)["samples"]
    assert [s["step"] for s in samples] == [0, 2, 4, 5]
    for sample in samples:
        assert [(a["prompt"], a["reference"]) for a in sample["answers"]] == [
            ("What is the capital of Arvenia?", None), ("Count from 1 to 4.", None)]
    assert len(SAMPLE_LINE.findall(result.stdout)) == 8


def test_without_an_eval_split_or_a_file_there_are_no_samples():
    from datasets import Dataset

    config = Config(eval_fraction=0.0)
    samples = Samples.for_run(config, {"train": Dataset.from_list([{"input_ids": [1], "labels": [1]}])}, [], "cpu")
    assert samples.prompts == []


def test_prompts_from_rows_in_any_data_prep_format(prompt_format, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name the capital of Fernia.", "input": "", "output": "The capital of Fernia is Quarry Bay."},
        {"prompt": "Count from 2 to 5.", "system": "Answer briefly."},
        {"text": "<s>[INST] Count from 1 to 4. [/INST] 1, 2, 3, 4 </s><s>[INST] And from 5 to 8? [/INST] 5, 6, 7, 8 </s>"},
    ]) + "\n")
    asked = read_prompts(Config(sample_prompts=str(rows)))
    prompts = rendered(asked, prompt_format, system_prompt="Be kind.")
    assert [(p.text, p.reference) for p in prompts] == [
        ("Name the capital of Fernia.", "The capital of Fernia is Quarry Bay."), ("Count from 2 to 5.", None),
        ("And from 5 to 8?", "5, 6, 7, 8")]
    # rendered as training renders a row's prompt part: the run's system prompt where the row has none
    first = [Message("system", "Be kind."), Message("user", "Name the capital of Fernia.")]
    assert prompts[0].ids == prompt_format.prompt_ids(first)
    assert prompts[1].ids == prompt_format.prompt_ids([Message("system", "Answer briefly."),
                                                       Message("user", "Count from 2 to 5.")])
    whole = prompt_format.encode([Message("system", "Be kind."), Message("user", "Count from 1 to 4."),
                                  Message("assistant", "1, 2, 3, 4"), Message("user", "And from 5 to 8?"),
                                  Message("assistant", "5, 6, 7, 8")])[0]
    assert whole[:len(prompts[2].ids)] == prompts[2].ids


@pytest.mark.parametrize("family, template", [("v1", "mistral"), ("v1", "instruction"), ("v3", "mistral"),
                                              ("tekken", "mistral")])
def test_an_eval_row_gives_its_prompt_and_its_last_answer(family, template, tiny_model, tiny_v3, tiny_tekken):
    from datasets import Dataset

    tokenizer = {"v1": tiny_model / "tokenizer.model", "v3": tiny_v3 / "tokenizer.model",
                 "tekken": tiny_tekken / "tokenizer.json"}[family]
    fmt = load_prompt_format(tokenizer, template)
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 1 to 3."},
                           {"role": "assistant", "content": "1, 2, 3"},
                           {"role": "user", "content": "Name the capital of Arvenia."},
                           {"role": "assistant", "content": "The capital of Arvenia is Lumeport."}]}
    prepared = prepare_rows([("x:1", record)], "auto", fmt, 256, False, 0.0, 0, False, "x")
    [prompt] = from_eval_rows(Dataset.from_list(prepared.train), fmt, 3)
    assert prompt.text.endswith("Name the capital of Arvenia.")  # v3 and Tekken put the system message in it
    assert prompt.reference == "The capital of Arvenia is Lumeport."
    conversation = [Message(m["role"], m["content"]) for m in record["messages"][:-1]]
    assert prompt.ids == fmt.prompt_ids(conversation)


def test_prompts_from_preference_pairs_take_the_chosen_answer_as_reference(tmp_path):
    """A DPO or ORPO run's --sample_prompts file may hold pairs (in any shape data_prep reads, or the run's columns)."""
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Name the capital of Fernia.", "chosen": "Quarry Bay.", "rejected": "Kell."},
        {"chosen": "\n\nHuman: Count from 2 to 4.\n\nAssistant: 2, 3, 4", "rejected": "\n\nHuman: Count from 2 to 4."
         "\n\nAssistant: 2, 4"},
        {"prompt": "Count from 1 to 3."},
    ]) + "\n")
    for config in (Config(sample_prompts=str(rows), method="dpo"), Config(sample_prompts=str(rows))):
        asked = read_prompts(config)
        assert [(a.conversation[-1].content, a.reference) for a in asked] == [
            ("Name the capital of Fernia.", "Quarry Bay."), ("Count from 2 to 4.", "2, 3, 4"),
            ("Count from 1 to 3.", None)]
    columns = tmp_path / "columns.jsonl"
    columns.write_text(json.dumps({"q": "Name the capital of Fernia.", "good": "Quarry Bay.", "bad": "Kell."}) + "\n")
    asked = read_prompts(Config(sample_prompts=str(columns), method="orpo", prompt_field="q", chosen_field="good",
                                rejected_field="bad"))
    assert [(a.conversation[-1].content, a.reference) for a in asked] == [("Name the capital of Fernia.", "Quarry Bay.")]


def test_a_bad_prompts_file_is_one_error_line_and_nothing_is_written(fixture_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--sample_prompts",
                        str(tmp_path / "missing.txt"), "--output_dir", str(out), check=False)
    one_line_error(result, "--sample_prompts", "missing.txt", "no such file")
    assert not out.exists()


@pytest.mark.parametrize("content, message", [("\n \n", "no prompts in it"),
                                              ('{"question": "Why?"}\n', "prompts.jsonl:1: no usable fields"),
                                              ("{oops\n", "prompts.jsonl:1: malformed JSON")])
def test_a_prompts_file_that_holds_no_prompts_is_refused_naming_the_line(tmp_path, content, message):
    path = tmp_path / ("prompts.txt" if "no prompts" in message else "prompts.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        read_prompts(Config(sample_prompts=str(path)))


def tiny_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    return model


def training_state(model):
    return ([m.training for m in model.modules()],
            [getattr(m, "gradient_checkpointing", None) for m in model.modules()], model.config.use_cache)


def take_one(model, prompt_format, backend, tmp_path):
    from qlora.samples import Prompt

    samples = Samples([Prompt(prompt_format.prompt_ids([Message("user", "Count from 1 to 4.")]), "Count", None)],
                      prompt_format, 4, backend, True, 4, tmp_path)
    state = types.SimpleNamespace(global_step=7, is_world_process_zero=True)
    samples.callback.on_evaluate(types.SimpleNamespace(report_to=[]), state, None, model=model)
    return samples


def test_taking_a_sample_puts_the_model_and_the_random_state_back(tiny_model, prompt_format, tmp_path):
    model = tiny_peft(tiny_model)
    before, rng = training_state(model), torch.get_rng_state()
    samples = take_one(model, prompt_format, "cpu", tmp_path)
    assert training_state(model) == before and torch.equal(torch.get_rng_state(), rng)
    assert [s["step"] for s in samples.taken] == [7] and len(samples.taken[0]["answers"]) == 1


def test_on_unsloth_inference_mode_and_back_keep_each_modules_checkpointing(tiny_model, prompt_format, tmp_path,
                                                                            monkeypatch):
    """Unsloth's for_training turns gradient checkpointing on in every module that has it (and for_inference off):
    a run that checkpoints some layers, or none, must find them as they were."""
    calls = []

    def switch(model, on, **kwargs):
        calls.append("training" if on else "inference")
        for module in model.modules():
            module.training = on
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = on

    unsloth = types.ModuleType("unsloth")
    unsloth.FastLanguageModel = types.SimpleNamespace(for_inference=lambda m: switch(m, False),
                                                      for_training=lambda m, **k: switch(m, True))
    monkeypatch.setitem(sys.modules, "unsloth", unsloth)
    model = tiny_peft(tiny_model)
    model.base_model.model.model.layers[0].gradient_checkpointing = False  # one layer keeps its activations
    before = training_state(model)
    take_one(model, prompt_format, "unsloth", tmp_path)
    assert calls == ["inference", "training"] and training_state(model) == before


def test_samples_go_to_tensorboard_and_wandb_when_named(tmp_path, monkeypatch):
    written, logged = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_text(self, tag, text, step):
            written.append((self.log_dir, tag, text, step))

        def flush(self):
            pass

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=object(), Table=Table, log=logged.append))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    samples = Samples([], None, 4, "cpu", True, 4, tmp_path)
    entry = {"step": 8, "answers": [{"prompt": "a | b", "answer": "c\nd", "reference": None}]}
    samples.publish(entry, ["tensorboard", "wandb"])
    [(log_dir, tag, text, step)] = written
    assert (log_dir, tag, step) == (str(tmp_path / "runs" / "samples"), "samples", 8)
    assert text.splitlines()[-1] == "| a \\| b | c d |   |"
    [record] = logged
    assert record["train/global_step"] == 8 and record["samples"].data == [[8, "a | b", "c\nd", None]]
    samples.publish(entry, [])
    assert len(written) == len(logged) == 1
