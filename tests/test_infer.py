"""infer.py on the tiny fine-tune: the same prompt ids as training in every backend (transformers + PEFT adapter,
merged folder, llama.cpp GGUF), the same greedy tokens across them, streaming, EOS, chat, batch and bad input.

Greedy runs may part where the reference's top-2 logit margin is a near-tie (f16 rounding may flip those); every
parting is reported with its step and margin.
"""

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import re
import shlex

import pytest
import yaml

from conftest import run_script
from qlora import engines, export, export_job, fixtures, gguf_check, gguf_convert, infer
from qlora.chat import Message, load_prompt_format, tokenizer_file_in
from qlora.config import Config
from qlora.data import read_records, to_conversation

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 24
GREEDY = Config(temperature=0.0, max_new_tokens=MAX_NEW)
SYSTEM = "You are a terse assistant."


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is latency-bound: one thread is faster, and spares OpenMP's spin-waiting on shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter(trained_adapter):
    """The tiny fine-tune: a real smoke run of train_unsloth.py."""
    return trained_adapter


@pytest.fixture(scope="module")
def export_dir(adapter, tmp_path_factory):
    """export_gguf.py's layout: merged/ and model-f16.gguf side by side."""
    folder = tmp_path_factory.mktemp("export")
    export.merge(adapter, engines.adapter_base(adapter), folder / "merged")
    return folder


@pytest.fixture(scope="module")
def merged(export_dir):
    return export_dir / "merged"


def to_gguf(merged_dir, target):
    try:
        converter = gguf_convert.find_converter()
    except export_job.ExportError as err:
        pytest.skip(f"no GGUF without llama.cpp's converter: {err}")
    template = load_prompt_format(tokenizer_file_in(merged_dir)).chat_template(space_after_special=False)
    gguf_convert.convert_f16(merged_dir, target, converter, template)
    return target


@pytest.fixture(scope="module")
def gguf(export_dir):
    return to_gguf(export_dir / "merged", export_dir / "model-f16.gguf")


def open_session(path, config=GREEDY, seed=0, compare_base=False) -> infer.Session:
    """What infer.py loads for `path`, on this machine's default backend."""
    template, _ = infer.prompt_settings(path, config, None)
    return infer.open_session(path, config, template, seed=seed, compare_base=compare_base)


@pytest.fixture(scope="module")
def sessions(request, adapter, merged):
    """name -> Session; "gguf" only where llama.cpp's converter is installed."""
    found = {"adapter": open_session(adapter), "merged": open_session(merged)}
    try:
        found["gguf"] = open_session(request.getfixturevalue("gguf"))
    except pytest.skip.Exception:
        pass
    return found


def backend(sessions, name) -> infer.Session:
    if name not in sessions:
        pytest.skip("no GGUF: llama.cpp's converter is not installed (sh scripts/get_llama_cpp_converter.sh)")
    return sessions[name]


BACKENDS = ["adapter", "merged", "gguf"]


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def conversations(sample_data) -> list:
    """Finished training conversations (single- and multi-turn), some with a system message: the fine-tune's own
    distribution, where it is confident."""
    rows = [to_conversation(r, "auto", where) for where, r in itertools.islice(read_records(sample_data), 60)]
    multi = [c for c in rows if len(c) > 2][:2]
    assert multi, "the sample set should hold multi-turn rows"
    return rows[:5] + multi + [[Message("system", SYSTEM)] + rows[5]]


@pytest.fixture(scope="module")
def prompts(conversations) -> list:
    return [c[:-1] for c in conversations]


# ---------------------------------------------------------------- helpers


def reference_margin(session: infer.Session, ids: list[int]) -> float:
    """Top-2 logit margin of the next token after `ids` in a transformers session's model."""
    import torch

    with torch.no_grad():
        logits = session.engine.model(torch.tensor([ids])).logits[0, -1].float()
    top2 = logits.topk(2).values
    return float(top2[0] - top2[1])


def parting(ref: list[int], got: list[int]) -> int | None:
    """First step where two generations differ (one ending earlier counts), or None."""
    return next((i for i in range(max(len(ref), len(got))) if ref[i : i + 1] != got[i : i + 1]), None)


def check_agreement(reference: infer.Session, prompt_ids: list[list[int]], ref_runs, runs, label: str) -> None:
    """Fail on a parting that is not a near-tie; print the agreement figures (pytest -s shows them)."""
    partings, failures, same_tokens, total = [], [], 0, 0
    for n, (ids, ref, got) in enumerate(zip(prompt_ids, ref_runs, runs, strict=True)):
        step = parting(ref, got)
        total += max(len(ref), len(got))
        same_tokens += max(len(ref), len(got)) if step is None else step
        if step is None:
            continue
        margin = reference_margin(reference, ids + ref[:step])
        partings.append(f"prompt {n} step {step} margin {margin:.4f}")
        if margin >= gguf_check.NEAR_TIE:
            failures.append(partings[-1])
    figures = (f"{label}: {len(prompt_ids) - len(partings)}/{len(prompt_ids)} prompts identical, "
               f"{same_tokens}/{total} tokens before any parting; partings: {partings or 'none'}")
    print(figures)
    assert not failures, f"greedy tokens part where the reference is not near a tie ({failures}); {figures}"


class Recorder(io.StringIO):
    """A terminal stand-in that keeps every write, to see the answer arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


# ---------------------------------------------------------------- same prompt as training


def test_prompt_settings_come_from_the_training_run(tmp_path):
    """An adapter folder, and export_gguf.py's merged/ and .gguf below it, all render the training system prompt."""
    run = tmp_path / "run"
    (run / "export" / "merged").mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("system_prompt: Answer briefly.\ntemplate: mistral\n")
    (run / "export" / "config.yaml").write_text("system_prompt: null\n")  # the export's own settings
    (run / "export" / "model-f16.gguf").write_text("")
    for path in (run, run / "export" / "merged", run / "export" / "model-f16.gguf"):
        assert infer.prompt_settings(path, Config(), None) == ("mistral", "Answer briefly.")
    assert infer.prompt_settings(run, Config(), "Be kind. ") == ("mistral", "Be kind.")
    assert infer.prompt_settings(run, Config(), "") == ("mistral", None)
    (run / "config.yaml").write_text("not_a_setting: 1\n")  # not ours: ignored, the export's is used
    assert infer.prompt_settings(run / "export" / "model-f16.gguf", Config(), None) == ("mistral", None)


def received_ids(session: infer.Session, conversation) -> list[int]:
    """The prompt ids the backend itself received for this conversation (not what we meant to send)."""
    if isinstance(session.engine, engines.LlamaCppEngine):
        session.engine.llm.reset()
        session.reply(conversation, io.StringIO())
        llm = session.engine.llm
        return llm.input_ids[: llm.n_tokens].tolist()  # prompt + generated tokens, as evaluated by llama.cpp
    seen = []
    embeddings = session.engine.model.get_input_embeddings()
    hook = embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].tolist()))
    try:
        session.reply(conversation, io.StringIO())
    finally:
        hook.remove()
    return seen[0]  # the first forward pass is the whole prompt


@pytest.mark.parametrize("name", BACKENDS)
def test_prompt_is_the_training_prefix(sessions, name, conversations):
    """Each backend receives exactly the ids that precede the answer in the conversation's training row."""
    session = backend(sessions, name)
    for conversation in (conversations[-1], conversations[5]):  # system + user; multi-turn
        training_ids, _ = session.fmt.encode(conversation)
        answer = session.fmt.vocab.encode(conversation[-1].content) + [session.fmt.eos]
        prefix = training_ids[: len(training_ids) - len(answer)]
        seen = received_ids(session, conversation[:-1])
        assert seen[: len(prefix)] == prefix
        if name != "gguf":
            assert seen == prefix
        assert training_ids[len(prefix):] == answer


# ---------------------------------------------------------------- same answers everywhere


def smoke_answers(session: infer.Session) -> dict[str, str]:
    """The session's greedy answers to the questions scripts/smoke.sh asks, as infer.py --prompt renders them."""
    asked = [infer.conversation(prompt, None) for prompt in fixtures.SMOKE_PROMPTS]
    return dict(zip(fixtures.SMOKE_PROMPTS, session.answers(asked, batch_size=1), strict=True))


def test_smoke_sh_asks_the_smoke_prompts():
    loop = re.search(r"for prompt in (.*); do", (ROOT / "scripts" / "smoke.sh").read_text())
    assert loop and shlex.split(loop.group(1)) == list(fixtures.SMOKE_PROMPTS)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_fine_tune_answers_right_on_every_backend(sessions, name):
    """A made-up country's capital and counting, which only the fine-tune can know: the smoke run learned them, and
    the merged folder and the GGUF file keep what it learned."""
    assert smoke_answers(backend(sessions, name)) == fixtures.SMOKE_PROMPTS


def greedy_runs(session: infer.Session, prompt_ids):
    return [session.engine.generate([ids], GREEDY)[0] for ids in prompt_ids]


@pytest.fixture(scope="module")
def reference_runs(sessions, prompts):
    reference = sessions["adapter"]
    ids = [reference.fmt.prompt_ids(p) for p in prompts]
    return ids, greedy_runs(reference, ids)


@pytest.fixture(scope="module")
def answered(prompts, reference_runs) -> list:
    """Prompts the fine-tune answers with several tokens (the smoke run answers some with EOS at once)."""
    chosen = [p for p, run in zip(prompts, reference_runs[1], strict=True) if len(run) >= 8]
    assert len(chosen) >= 3, "the tiny fine-tune should answer most training prompts"
    return chosen


@pytest.mark.parametrize("name", ["merged", "gguf"])
def test_backends_give_the_adapters_greedy_tokens(sessions, name, reference_runs):
    ids, ref = reference_runs
    check_agreement(sessions["adapter"], ids, ref, greedy_runs(backend(sessions, name), ids),
                    f"{name} vs adapter")


def test_left_padded_batches_give_the_single_prompt_tokens(sessions, reference_runs):
    ids, ref = reference_runs
    batched = []
    for start in range(0, len(ids), 3):
        batched += sessions["adapter"].engine.generate(ids[start : start + 3], GREEDY)
    check_agreement(sessions["adapter"], ids, ref, batched, "batches of 3 vs one by one")


# ---------------------------------------------------------------- streaming and stopping


@pytest.mark.parametrize("name", BACKENDS)
def test_streaming_gives_the_non_streamed_answer(sessions, name, answered):
    session = backend(sessions, name)
    for prompt in answered[:3]:
        out = Recorder()
        streamed = session.reply(prompt, out)
        assert out.getvalue() == streamed + "\n"
        assert streamed == session.answers([prompt], batch_size=1)[0]
        assert len([w for w in out.writes if w.strip()]) > 1, "the answer should arrive in pieces"


@pytest.mark.parametrize("text, shown", [
    ("The capital of Arvenia is Lumeport.", "The capital of Arvenia is Lumeport."),
    ("Sure thing [INST] next question [/INST] more", "Sure thing"),
    ("done </s> and then some", "done"),
    ("héllo 日本語 🎉 naïve — ok", "héllo 日本語 🎉 naïve — ok"),
    ("a [b] [IN c\n", "a [b] [IN c"),
])
def test_stream_pieces_add_up_and_never_show_a_marker(prompt_format, text, shown):
    """Nothing shown is ever taken back: no half character, no start of a marker that then completes."""
    stream = infer.TextStream(prompt_format)
    pieces = [stream.add(i) for i in prompt_format.vocab.encode(text)] + [stream.finish()]
    assert "".join(pieces) == shown == stream.answer
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def eos_models(merged, sessions, answered, tmp_path_factory):
    """The merged model with the LM head's EOS row swapped with that of the last token that first appears in its
    answer to answered[0] (not the first token): that answer then stops right before it. Returns (folder, tokens)."""
    from safetensors.torch import load_file, save_file

    session = sessions["merged"]
    tokens = session.engine.generate([session.fmt.prompt_ids(answered[0])], GREEDY)[0]
    firsts = [i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]]
    assert firsts, f"the answer {tokens} repeats a single token"
    step = firsts[-1]
    folder = tmp_path_factory.mktemp("eos") / "merged"
    shutil.copytree(merged, folder)
    weights_file = next(folder.glob("*.safetensors"))
    weights = load_file(weights_file)
    head = weights["lm_head.weight"]
    eos = session.fmt.eos
    head[[eos, tokens[step]]] = head[[tokens[step], eos]]
    save_file(weights, weights_file, metadata={"format": "pt"})
    return folder, tokens[:step]


@pytest.mark.parametrize("name", ["merged", "gguf"])
def test_generation_stops_at_eos(eos_models, answered, name):
    folder, expected = eos_models
    path = folder if name == "merged" else to_gguf(folder, folder.parent / "model-f16.gguf")
    session = open_session(path)
    out = io.StringIO()
    answer = session.reply(answered[0], out)
    ids = session.fmt.prompt_ids(answered[0])
    assert session.engine.generate([ids], GREEDY)[0] == expected  # not MAX_NEW tokens: EOS ended it
    assert answer == infer.answer_text(session.fmt, expected)
    assert "</s>" not in out.getvalue() and "[INST]" not in out.getvalue()


@pytest.mark.parametrize("name", ["merged", "gguf"])
def test_sampling_follows_the_seed(sessions, merged, answered, name):
    """Temperature above 0 samples; the same seed gives the same answers again on a fresh load (as --seed does)."""
    backend(sessions, name)
    path = merged if name == "merged" else merged.parent / "model-f16.gguf"
    # hot enough that two seeds part: the smoke-trained model is sure of its answers (at 1.5 two seeds gave the same)
    sampled = Config(temperature=4.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW)
    runs = {seed: open_session(path, sampled, seed=seed).answers(answered[:4], 1) for seed in (1, 2)}
    assert runs[1] == open_session(path, sampled, seed=1).answers(answered[:4], 1)
    assert runs[1] != runs[2]


# ---------------------------------------------------------------- modes


def test_compare_base_shows_the_base_then_the_fine_tune(sessions, adapter, answered, tiny_model):
    session = open_session(adapter, compare_base=True)
    out = io.StringIO()
    answer = session.reply(answered[0], out)
    base_answer = open_session(tiny_model).answers([answered[0]], 1)[0]
    assert answer == sessions["adapter"].answers([answered[0]], 1)[0]
    assert out.getvalue() == f"[base]\n{base_answer}\n[fine-tuned]\n{answer}\n"
    assert base_answer != answer


def infer_cli(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """infer.py as a user runs it, greedy unless told otherwise."""
    command = [sys.executable, str(ROOT / "infer.py"), *args, "--temperature", "0", "--max_new_tokens", str(MAX_NEW)]
    result = subprocess.run(command, check=False, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # as one_thread, and the same numerics
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_batch_mode_writes_one_answer_per_line_in_order(adapter, sessions, prompts, tmp_path):
    """Batches of 3 (left padding) from the command line: the answers the same batches give in this process."""
    singles = [p for p in prompts if len(p) == 1][:4]
    rows = [{"id": n, "prompt": p[0].content} for n, p in enumerate(singles)]
    rows[1]["system"] = SYSTEM
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" +
                      "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    target = tmp_path / "answers.jsonl"
    infer_cli(str(adapter), "--input", str(source), "--output", str(target), "--batch_size", "3")
    written = [json.loads(line) for line in target.read_text().splitlines()]
    conversations = [infer.conversation(r["prompt"], r.get("system")) for r in rows]
    assert [w["id"] for w in written] == list(range(len(rows)))
    assert [w["answer"] for w in written] == sessions["adapter"].answers(conversations, batch_size=3)
    settings = yaml.safe_load((tmp_path / "answers.config.yaml").read_text())  # what the answers came from
    assert (settings["model"], settings["template"], settings["batch_size"]) == (str(adapter), "mistral", 3)
    assert (settings["backend"], settings["base_model"]) == ("cpu", engines.adapter_base(adapter))
    assert (settings["temperature"], settings["max_new_tokens"]) == (0.0, MAX_NEW)  # infer_cli's flags, not defaults
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_chat_keeps_history_until_reset(merged, sessions):
    first, second = "Add 3 and 4.", "Count from 1 to 6."
    result = infer_cli(str(merged), "--chat", stdin=f"{first}\n\n{second}\n/reset\n{first}\n/exit\n{second}\n")
    session = sessions["merged"]
    a1 = session.answers([[Message("user", first)]], 1)[0]
    a2 = session.answers([[Message("user", first), Message("assistant", a1), Message("user", second)]], 1)[0]
    assert result.stdout == f"{a1}\n{a2}\n{a1}\n"


@pytest.mark.parametrize("word", ["quit", "/quit", "/bye", "Exit"])
def test_chat_ends_at_the_usual_words_which_never_reach_the_model(word, tiny_model):
    first, second = "Add 3 and 4.", "Count from 1 to 6."
    one_turn = infer_cli(str(tiny_model), "--chat", stdin=f"{first}\n")
    result = infer_cli(str(tiny_model), "--chat", stdin=f"{first}\n{word}\n{second}\n")
    assert one_turn.stdout.count("\n") == 1 and result.stdout == one_turn.stdout


def test_ctrl_d_at_the_chat_prompt_ends_the_line(tiny_model):
    """On a terminal, end of input at the `> ` prompt leaves a line break, so the shell's prompt starts a line."""
    import pty

    controller, terminal = pty.openpty()
    with subprocess.Popen([sys.executable, str(ROOT / "infer.py"), str(tiny_model), "--chat"], cwd=ROOT,
                          stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        os.close(terminal)
        os.write(controller, b"\x04")  # Ctrl-D
        out, err = process.communicate(timeout=300)
    os.close(controller)
    assert process.returncode == 0, err[-2000:]
    assert out == "> \n" and "/exit, /quit or Ctrl-D ends" in err


@pytest.mark.parametrize("case", ["missing", "neither", "not gguf", "no tokenizer", "empty prompt", "bad jsonl",
                                  "no base", "lora on a folder", "no lora file"])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_model):
    fake = tmp_path / "x.gguf"
    fake.write_text("not a model\n")
    bad_jsonl = tmp_path / "p.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"prompt": \n')
    args, expected = {
        "missing": ([str(tmp_path / "nope"), "--prompt", "hi"], "no such file or folder"),
        "neither": ([str(tmp_path), "--prompt", "hi"], "neither an adapter folder"),
        "not gguf": ([str(fake), "--prompt", "hi", "--tokenizer_name", str(tiny_model)], "cannot load this file"),
        "no tokenizer": ([str(fake), "--prompt", "hi", "--model_name", str(tmp_path)], "no tokenizer.model"),
        "empty prompt": ([str(tiny_model), "--prompt", "  "], "--prompt is empty"),
        "bad jsonl": ([str(tiny_model), "--input", str(bad_jsonl), "--output", str(tmp_path / "a.jsonl")],
                      f"{bad_jsonl}:2: malformed JSON"),
        "no base": ([str(tiny_model), "--prompt", "hi", "--compare_base"], "--compare_base needs an adapter folder"),
        "lora on a folder": ([str(tiny_model), "--prompt", "hi", "--lora", str(fake)], "--lora goes with a .gguf"),
        "no lora file": ([str(fake), "--prompt", "hi", "--lora", str(tmp_path / "a.gguf")], "a.gguf: no such file"),
    }[case]
    result = infer_cli(*args, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_that_does_not_load_is_one_clear_line(gguf, tmp_path):
    fake = tmp_path / "adapter.gguf"
    fake.write_text("not an adapter\n")
    result = infer_cli(str(gguf), "--prompt", "hi", "--lora", str(fake), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: --lora {fake}: not a LoRA adapter GGUF (export_gguf.py --lora_only writes one)"
    result = infer_cli(str(gguf), "--prompt", "hi", "--lora", str(gguf), check=False)  # a model, not an adapter
    assert result.returncode != 0 and "not a LoRA adapter GGUF" in result.stderr.strip().splitlines()[-1]


def test_a_prompts_file_that_is_not_utf8_and_a_batch_size_of_zero_are_one_line_errors(tmp_path):
    from qlora.engines import InferError
    from qlora.infer import read_prompts

    latin1 = tmp_path / "prompts.jsonl"
    latin1.write_bytes('{"prompt": "Café?"}\n'.encode("latin-1"))
    with pytest.raises(InferError, match=r"prompts.jsonl: not UTF-8 text \(byte 15\); save it as UTF-8 JSONL"):
        read_prompts(latin1, None)
    result = run_script("infer.py", str(tmp_path), "--input", str(latin1), "--batch_size", "0", check=False)
    assert result.returncode == 2 and "--batch_size: invalid positive_int value: '0'" in result.stderr
