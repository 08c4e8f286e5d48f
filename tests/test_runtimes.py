"""Every runtime a user loads the export into gives the model the ids training gave it (qlora/runtimes.py), for the v1,
v3 and Tekken stand-ins: transformers' apply_chat_template on the merged folder, the GGUF's template in
llama-cpp-python (llama_cpp.server's formatter) and in llama.cpp's own server (`llama-server --jinja`, its C++
template engine, the one LM Studio and Jan run), and the Modelfile's TEMPLATE in Go's text/template filled as Ollama
fills it. And llama-server's chat completion on the smoke fine-tune stops at </s>.

Needs llama-server (`sh scripts/install_llama_server.sh`) and Go (golang-go); scripts/test.sh installs both.
"""

import itertools
import json
import shutil
import socket

import pytest

from bench import standins
from qlora import export, export_job, export_report, fixtures, gguf_check, gguf_convert, runtimes
from qlora.chat import Message, load_prompt_format, tokenizer_file_in
from qlora.config import Config
from qlora.data import read_records, to_conversation
from qlora.modelfile import OLLAMA_TEMPLATE

SYSTEM = "Answer briefly."
needs_go = pytest.mark.skipif(shutil.which("go") is None,
                              reason="needs Go to run Ollama's template engine (sh scripts/install_go.sh)")


@pytest.fixture(scope="module")
def sample_conversations(sample_data) -> list:
    """Held-out shapes of the training data: whole conversations (one and several turns) and their prompts."""
    rows = [to_conversation(record, "auto", where) for where, record in itertools.islice(read_records(sample_data), 40)]
    chosen = rows[:2] + [c for c in rows if len(c) > 2][:2]
    return chosen + [c[:-1] for c in chosen] + [[Message("system", SYSTEM)] + c for c in chosen]


@pytest.fixture(scope="module", params=["tiny_model", "tiny_v3", "tiny_tekken"])
def export_of(request, tmp_path_factory):
    """An f16 export of a random adapter on one stand-in (the templates do not depend on the weights), without the
    runtime checks: the tests below run them one by one."""
    base = request.getfixturevalue(request.param)
    work = tmp_path_factory.mktemp(base.name)
    adapter = standins.save_random_adapter(base, work / "adapter")
    plan = export.run_export(Config(adapter_dir=str(adapter), export_dir=str(work / "export"), gguf_types=["f16"],
                                    base_model_16bit=str(base), system_prompt=SYSTEM))
    return plan, load_prompt_format(tokenizer_file_in(base))


def test_the_export_report_has_a_line_for_each_runtime(export_of):
    plan, _ = export_of
    report = json.loads((plan.export_dir / export_job.REPORT).read_text())
    names = [r["runtime"].split(" ")[0] for r in report["runtimes"]]
    assert names == ["transformers", "llama_cpp.server", "llama-server", "Ollama"]
    for r in report["runtimes"]:
        if r["runtime"].startswith("Ollama") and shutil.which("go") is None:
            assert "Go is not installed" in r["not_checked"]
            continue
        assert "not_checked" not in r and r["problems"] == [], r
        assert r["equal"] + r["edges"] == r["conversations"] == len(runtimes.CONVERSATIONS + gguf_check.CHECK_PROMPTS)
    assert "llama-server --jinja (model-f16.gguf): ok" in export_report.runtime_lines(report)


def test_transformers_renders_the_training_ids(export_of, sample_conversations):
    """apply_chat_template(tokenize=True) on the merged folder; the only differences are where transformers'
    tokenizer itself encodes a message unlike SentencePiece (runs of spaces: the v1 and v3 stand-ins' edge case)."""
    plan, prompt_format = export_of
    conversations = runtimes.CONVERSATIONS + sample_conversations
    result = runtimes.check_transformers(plan.merged_dir, prompt_format, conversations)
    assert result["problems"] == [] and result["equal"] >= len(conversations) - 1, result
    expected_edges = 0 if prompt_format.version == "tekken" else 1  # CONVERSATIONS[4]: spaces around messages
    assert result["edges"] == expected_edges


def test_the_hub_template_does_not_render_the_training_ids(tiny_model, prompt_format, tmp_path):
    """What the export replaces: Mistral v0.2's own template (the stand-in carries it, as the hub's checkout does)
    gives other ids than training in transformers and in a GGUF for conversations with an answer (one `▁` off after
    `<s>` in transformers, before each answer in both), and refuses a system message."""
    conversations = [c for c in runtimes.CONVERSATIONS if "system" not in {m.role for m in c}]
    in_transformers = runtimes.check_transformers(tiny_model, prompt_format, conversations)
    assert in_transformers["problems"] and in_transformers["equal"] == 0, in_transformers
    with pytest.raises(Exception, match="roles must alternate"):
        runtimes.check_transformers(tiny_model, prompt_format, [runtimes.CONVERSATIONS[1]])
    gguf = tmp_path / "hub-template.gguf"
    gguf_convert.convert_f16(tiny_model, gguf, gguf_convert.find_converter(), fixtures.HUB_V1_CHAT_TEMPLATE)
    in_gguf = runtimes.check_llama_cpp_python(gguf, prompt_format, conversations)
    with_answers = [c for c in conversations if len(c) > 1]
    assert len(in_gguf["problems"]) == len(with_answers) and in_gguf["equal"] == len(conversations) - len(with_answers)


def test_llama_cpp_python_renders_the_training_ids(export_of, sample_conversations):
    plan, prompt_format = export_of
    conversations = runtimes.CONVERSATIONS + sample_conversations
    result = runtimes.check_llama_cpp_python(plan.gguf("f16"), prompt_format, conversations)
    assert result["problems"] == [] and result["equal"] == len(conversations), result


def test_llama_server_renders_the_training_ids(export_of, sample_conversations):
    """llama.cpp's own server (C++ Jinja engine and tokenizer, built from llama-cpp-python's llama.cpp source with
    its flags), on 127.0.0.1: /apply-template then /tokenize as its chat completion does. A chat that ends with a
    prompt gets the training ids exactly."""
    assert runtimes.find_llama_server(), f"llama-server is not installed: {runtimes.INSTALL_LLAMA_SERVER}"
    plan, prompt_format = export_of
    conversations = runtimes.CONVERSATIONS + sample_conversations
    result = runtimes.check_llama_server(plan.gguf("f16"), prompt_format, conversations)
    assert result["problems"] == [], result
    # a chat ending with an answer is continued: v1's text [/INST] then gets that answer without its leading `▁`
    continued = sum(c[-1].role == "assistant" for c in conversations)
    assert result["edges"] == (continued if prompt_format.version == "v1" else 0), result


@needs_go
def test_ollama_renders_the_training_ids(export_of, sample_conversations):
    """The Modelfile's TEMPLATE in Go's text/template as Ollama fills it, its SYSTEM added as Ollama adds it, then
    llama.cpp's tokenizer; v3 and Tekken differ only on an earlier answer ending in spaces, which Go cannot trim."""
    plan, prompt_format = export_of
    template = (plan.export_dir / "Modelfile").read_text().split('TEMPLATE """')[1].split('"""')[0]
    conversations = runtimes.CONVERSATIONS + sample_conversations
    result = runtimes.check_ollama(template, SYSTEM, plan.gguf("f16"), prompt_format, conversations)
    assert result["problems"] == [], result
    assert result["edges"] == (0 if prompt_format.version == "v1" else 1)


@needs_go
def test_the_ollama_renderer_fills_the_template_as_ollama_does(tmp_path):
    """Consecutive messages of one role merged with a blank line; every system message in .System and in .Messages;
    the Modelfile's SYSTEM first only when the request has none; the legacy form run once per turn."""
    probe = "S={{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    conversation = [Message("system", "a"), Message("user", "u1"), Message("user", "u2"), Message("assistant", "x")]
    assert runtimes.ollama_render(probe, "modelfile", [conversation], tmp_path) == [
        "S=a|system:a;user:u1\n\nu2;assistant:x;"]
    assert runtimes.ollama_render(probe, "modelfile", [conversation[1:2]], tmp_path) == [
        "S=modelfile|system:modelfile;user:u1;"]
    legacy = "[{{ .System }}|{{ .Prompt }}|{{ if .Response }}{{ .Response }}{{ end }}]"
    turns = [Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2")]
    assert runtimes.ollama_render(legacy, "sys", [turns], tmp_path, legacy=True) == ["[sys|u1|a1][|u2|]"]
    assert runtimes.ollama_render(OLLAMA_TEMPLATE, None, [turns], tmp_path) == [
        "[INST] u1 [/INST] a1</s>[INST] u2 [/INST]"]


def test_llama_server_chat_stops_at_the_end_of_the_answer(trained_adapter, tmp_path):
    """The smoke fine-tune's f16 GGUF served by llama-server: a two-turn chat with a system message finishes with
    `stop` (it generated </s>), not `length`, and answers what training taught it; the server is gone after."""
    plan = export.run_export(Config(adapter_dir=str(trained_adapter), export_dir=str(tmp_path / "export"),
                                    gguf_types=["f16"]))
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of Arvenia?"},
                {"role": "assistant", "content": "The capital of Arvenia is Lumeport."},
                {"role": "user", "content": "Count from 3 to 9."}]
    with runtimes.LlamaServer(plan.gguf("f16")) as server:
        reply = server.post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 64})
        port, process = server.port, server.process
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert choice["message"]["content"].strip() == fixtures.SMOKE_PROMPTS["Count from 3 to 9."], choice
    assert process.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_llama_server_that_cannot_run_is_reported_not_failed(monkeypatch, tmp_path, prompt_format):
    """A broken or missing server says nothing of the template: the report line says why it was not checked, and the
    export goes on."""
    monkeypatch.setenv(runtimes.LLAMA_SERVER_ENV, "/bin/false")
    result = runtimes.check_llama_server(tmp_path / "model.gguf", prompt_format, runtimes.CONVERSATIONS)
    assert result["problems"] == [] and "llama-server could not be run" in result["not_checked"], result
