"""The whole chain for the tokenizer families beyond v1, on their stand-ins: tiny-mistral-v3 (Mistral 7B Instruct
v0.3's SentencePiece, [INST]/[/INST] control tokens) and tiny-mistral-tekken (Nemo-shaped: Tekken, head_dim 128).

data_prep.py, a few training steps on the CPU, export to an f16 GGUF (whose check in llama.cpp fails the export unless
llama.cpp gives back our ids from the rendered text and decodes the merged model's greedy tokens), export --lora_only
(adapter.gguf on the converted base, checked the same way), then infer: llama.cpp's greedy answer is the adapter's. The
Modelfile's TEMPLATE rendered by Go's text/template, as Ollama does, is the training text.
"""

import json
import shutil

import pytest

from conftest import run_script
from qlora import export, export_job, gguf_check, infer, modelfile, runtimes
from qlora.chat import Message, MistralControl, load_prompt_format, tokenizer_file_in
from qlora.config import Config

SYSTEM = "Answer in one line."
STEPS = "4"
PROMPTS = [[Message("user", "What is the capital of Arvenia?")],
           [Message("system", SYSTEM), Message("user", "Count from 3 to 9.")],
           [Message("user", "Name the capital of Kell."), Message("assistant", "The capital of Fernia is Quarry Bay."),
            Message("user", "Count from 1 to 4.")]]


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_tekken"])
def chain(request, sample_data, tmp_path_factory):
    """data_prep -> train -> export (f16) -> export --lora_only, for one stand-in."""
    base = request.getfixturevalue(request.param)
    work = tmp_path_factory.mktemp(base.name)
    prepared = run_script("data_prep.py", "--config", "configs/smoke.yaml", "--model_name", str(base),
                          "--dataset", str(sample_data), "--output_dir", str(work / "data"), "--system_prompt", SYSTEM)
    run_script("train_unsloth.py", "--config", "configs/smoke.yaml", "--model_name", str(base),
               "--dataset", str(work / "data"), "--output_dir", str(work / "run"), "--max_steps", STEPS,
               "--eval_steps", STEPS, "--system_prompt", SYSTEM)
    adapter = work / "run"
    merged = export.run_export(Config(adapter_dir=str(adapter), export_dir=str(work / "export"), gguf_types=["f16"]),
                               prompts=PROMPTS)
    lora = export.run_export(Config(adapter_dir=str(adapter), export_dir=str(work / "lora"), lora_only=True,
                                    convert_base=True, ollama_base="tiny:f16"), prompts=PROMPTS)
    return {"base": base, "data": work / "data", "data_log": prepared.stdout, "adapter": adapter, "merged": merged,
            "lora": lora, "format": load_prompt_format(tokenizer_file_in(base))}


def test_data_report_names_the_family(chain):
    version = "v3" if chain["base"].name.endswith("v3") else "tekken"
    assert chain["format"].version == version and isinstance(chain["format"], MistralControl)
    stats = json.loads((chain["data"] / "stats.json").read_text())
    assert stats["tokenizer"] == chain["format"].description and stats["tokenizer"].startswith(f"{version} (")
    assert f"tokenizer               {stats['tokenizer']}" in chain["data_log"]


def test_exports_are_checked_and_carry_the_tokenizer(chain):
    """run_export raises on any problem: here every check ran and passed (f16 and the adapter on the f16 base)."""
    for plan, entry_type in ((chain["merged"], "f16"), (chain["lora"], "lora f32")):
        report = json.loads((plan.export_dir / "export_report.json").read_text())
        (entry,) = report["files"]
        assert entry["type"] == entry_type and entry["problems"] == [] and entry["tokenizer_ok"], entry
        assert entry["metadata"]["tokenizer"] == chain["format"].vocab.gguf_tokenizer
    assert tokenizer_file_in(chain["adapter"]).read_bytes() == tokenizer_file_in(chain["base"]).read_bytes()


def test_llama_cpp_answers_as_the_adapter(chain):
    asked = [PROMPTS[0], PROMPTS[2]]
    settings = Config(temperature=0.0, max_new_tokens=12, backend="cpu")
    adapter = infer.open_session(chain["adapter"], settings, "mistral").answers(asked, batch_size=1)
    gguf = infer.open_session(chain["merged"].gguf("f16"), settings, "mistral").answers(asked, batch_size=1)
    on_base = infer.open_session(chain["lora"].base_gguf, settings, "mistral",
                                 lora=chain["lora"].adapter_gguf).answers(asked, batch_size=1)
    assert gguf == adapter == on_base


@pytest.mark.skipif(shutil.which("go") is None,
                    reason="needs Go to run Ollama's template engine (apt-get install golang-go)")
def test_modelfile_template_renders_the_training_text(chain, tmp_path):
    fmt = chain["format"]
    shapes = PROMPTS + [PROMPTS[2] + [Message("assistant", "1, 2, 3, 4")],
                        [Message("system", SYSTEM)] + PROMPTS[2] + [Message("assistant", "1, 2, 3, 4")]]
    for plan in (chain["merged"], chain["lora"]):
        text = (plan.export_dir / "Modelfile").read_text()
        assert f'TEMPLATE """{modelfile.OLLAMA_CONTROL_TEMPLATE}"""' in text
    rendered = runtimes.ollama_render(modelfile.OLLAMA_CONTROL_TEMPLATE, None, shapes, tmp_path)
    for conversation, text in zip(shapes, rendered, strict=True):
        assert "<s>" + text == gguf_check.rendered_text(fmt, conversation), conversation


def test_rendered_text_spells_out_the_control_tokens(chain):
    conversation = [Message("system", "S"), Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2")]
    assert gguf_check.rendered_text(chain["format"], conversation) == "<s>[INST]U1[/INST]A1</s>[INST]S\n\nU2[/INST]"


def test_known_ollama_bases():
    for base, tag in (("unsloth/mistral-7b-instruct-v0.3-bnb-4bit", "mistral:v0.3"),
                      ("unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit", "mistral-nemo:12b")):
        assert export_job.ollama_base(base, None) == tag
