"""What the runtimes a user loads the export into make of a conversation, against the ids training saw.

Users rarely feed our ids to a model; each runtime renders the conversation with the template the export wrote, then
tokenizes the text itself:

| runtime | template it reads | rendered by | tokenized by |
|---|---|---|---|
| transformers, vLLM | merged/'s chat_template | Python's jinja2 | merged/'s tokenizer (transformers) |
| llama-server --jinja, LM Studio, Jan | the GGUF's tokenizer.chat_template | llama.cpp's C++ Jinja engine | llama.cpp |
| llama_cpp.server (llama-cpp-python) | the GGUF's tokenizer.chat_template | jinja2 (Jinja2ChatFormatter) | llama.cpp |
| Ollama | the Modelfile's TEMPLATE | Go's text/template (ollama_render.go) | llama.cpp |

Each check runs the runtime itself on the export's files and compares its ids with `PromptFormat.encode`. One edge
belongs to a tokenizer, not to a template: transformers' tokenizer of Mistral's tokenizer.model (tokenizers' BPE)
splits a run of spaces, or a space that opens a message, unlike SentencePiece, in any text. A conversation holding such
a message is reported as that tokenizer's edge, not as a template fault; llama.cpp and Ollama tokenize it as Mistral.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import isolate
from .chat import Conversation, Message, MistralControl, PromptFormat
from .gguf_check import llama_cpp_vocab_facts

LLAMA_SERVER_ENV = "LLAMA_SERVER"  # the llama-server binary, where it is not in the virtualenv's bin/ or on PATH
INSTALL_LLAMA_SERVER = "sh scripts/install_llama_server.sh"
OLLAMA_RENDER = Path(__file__).with_name("ollama_render.go")
SERVER_START_TIMEOUT = 120  # seconds for llama-server to load a GGUF and answer /health

# The shapes every runtime is compared on: one and several turns, with and without a system message, non-ASCII text,
# spaces around a message, and a conversation ending with an answer (as a runtime renders a chat's history).
CONVERSATIONS = [
    [Message("user", "What is the capital of Arvenia?")],
    [Message("system", "Answer in one line."), Message("user", "Count from 3 to 9.")],
    [Message("user", "Add 12 and 30."), Message("assistant", "4"), Message("user", "Now subtract 5 from that.")],
    [Message("system", "Réponds en français."), Message("user", "Quelle est la capitale du Japon ?"),
     Message("assistant", "C'est Tōkyō (東京)."), Message("user", "Et de la Corée ? 😀")],
    [Message("user", " leading and trailing spaces  "), Message("assistant", "an answer  "),
     Message("user", "two  spaces inside")],
    [Message("system", "Be brief."), Message("user", "Hi."), Message("assistant", "Hello."),
     Message("user", "Bye."), Message("assistant", "Goodbye.")],
]


def as_dicts(conversation: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def runtime_entry(name: str, want: list[list[int]], got: list[list[int]] | None, edges: list[bool] | None = None,
            edge_note: str = "", why_not: str | None = None) -> dict:
    """One runtime's line of the report: how many conversations gave the training ids. A mismatch is a problem, which
    fails the export, unless the conversation is one of the runtime's known `edges` (`edge_note` says which)."""
    if got is None:
        return {"runtime": name, "not_checked": why_not, "problems": []}
    edges = edges or [False] * len(want)
    differ = [i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
    faults = [i for i in differ if not edges[i]]
    entry = {"runtime": name, "conversations": len(want), "equal": len(want) - len(differ),
             "edges": len(differ) - len(faults), "problems": []}
    if entry["edges"]:
        entry["edge_note"] = edge_note
    if faults:
        entry["problems"] = [f"{name}: conversation {i} renders other ids than training" for i in faults]
    return entry


# ---------------------------------------------------------------- transformers (and vLLM)


def space_after_special(tokenizer, prompt_format: PromptFormat) -> bool:
    """Whether text after a special token must carry its own SentencePiece space in a template for this Hugging Face
    tokenizer (transformers 5's tokenizer of tokenizer.model adds none there; llama.cpp's always does)."""
    probe = "x"
    plain = tokenizer(tokenizer.bos_token + probe, add_special_tokens=False)["input_ids"]
    return plain != [prompt_format.bos, *prompt_format.vocab.encode(probe)]


TRANSFORMERS_EDGE = ("transformers' tokenizer splits a run of spaces, or a space opening a message, unlike "
                     "SentencePiece, in any text")
LLAMA_SERVER_EDGE = ("a chat ending with an answer asks llama-server to continue it: it appends that answer's text "
                     "to the prompt as it is, without the space v1 training puts before an answer")
OLLAMA_EDGE = ("an earlier answer ending in spaces keeps them in Ollama: Go's text/template cannot trim them, as v3 and "
               "Tekken training does")


def transformers_splits_unlike_mistral(tokenizer, prompt_format: PromptFormat, conversation: Conversation) -> bool:
    return any(tokenizer(m.content, add_special_tokens=False)["input_ids"] != prompt_format.vocab.encode(m.content)
               for m in conversation if m.content)


def check_transformers(merged_dir: Path, prompt_format: PromptFormat, conversations: list[Conversation]) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    got = [list(tokenizer.apply_chat_template(as_dicts(c), tokenize=True, return_dict=False)) for c in conversations]
    edges = [transformers_splits_unlike_mistral(tokenizer, prompt_format, c) for c in conversations]
    return runtime_entry("transformers (merged/)", [prompt_format.encode(c)[0] for c in conversations], got, edges,
                   TRANSFORMERS_EDGE)


# ---------------------------------------------------------------- llama.cpp: llama-cpp-python and llama-server


def llama_cpp_python_ids(gguf: Path, conversations: list[list[dict]]) -> list[list[int]]:
    """llama_cpp.server's way (`Llama.__init__` builds this formatter from the GGUF's template and its BOS and EOS
    texts): the conversation through Jinja2ChatFormatter, the text through llama.cpp's tokenizer (run in a child
    process by `run_isolated`)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                    eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                                    bos_token=llm.detokenize([llm.token_bos()], special=True).decode())
    ids = []
    for messages in conversations:
        rendered = formatter(messages=messages)
        ids.append(llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True))
    return ids


def check_llama_cpp_python(gguf: Path, prompt_format: PromptFormat, conversations: list[Conversation]) -> dict:
    name = f"llama_cpp.server ({gguf.name})"
    try:
        got = isolate.run_isolated(f"llama-cpp-python's chat template on {gguf.name}", llama_cpp_python_ids, gguf,
                                   [as_dicts(c) for c in conversations])
    except (isolate.ChildCrashed, isolate.ChildFailed) as err:
        return {"runtime": name, "not_checked": str(err), "problems": [f"{name}: {err}"]}
    return runtime_entry(name, [prompt_format.encode(c)[0] for c in conversations], got)


def find_llama_server() -> str | None:
    """$LLAMA_SERVER, else the virtualenv's bin/ (where install_llama_server.sh puts it), else PATH."""
    beside = Path(sys.executable).parent / "llama-server"
    return os.environ.get(LLAMA_SERVER_ENV) or (str(beside) if beside.is_file() else shutil.which("llama-server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's own server on a GGUF, on 127.0.0.1 only, with its Jinja engine (`--jinja`); stopped on exit.

        with LlamaServer(path) as server:
            server.post("/apply-template", {"messages": [...]})
    """

    def __init__(self, gguf: Path, binary: str | None = None, context: int = 4096):
        self.gguf, self.binary, self.context = gguf, binary or find_llama_server(), context
        self.process, self.log = None, None

    def __enter__(self) -> LlamaServer:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [self.binary, "-m", str(self.gguf), "--jinja", "--host", "127.0.0.1", "--port", str(self.port),
             "-c", str(self.context), "-np", "1", "--threads", str(min(4, os.cpu_count() or 1))],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_until_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.process.returncode}: {self.last_log_line()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not answer within {SERVER_START_TIMEOUT} s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The ids a chat completion feeds the model: the template applied as /v1/chat/completions applies it, then
        tokenized as it tokenizes a prompt (BOS added, special tokens parsed)."""
        prompt = self.post("/apply-template", {"messages": messages})["prompt"]
        return self.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]


def check_llama_server(gguf: Path, prompt_format: PromptFormat, conversations: list[Conversation]) -> dict:
    name = f"llama-server --jinja ({gguf.name})"
    if find_llama_server() is None:
        return runtime_entry(name, [], None, why_not=f"llama-server is not installed (`{INSTALL_LLAMA_SERVER}`)")
    try:
        with LlamaServer(gguf) as server:
            got = [server.chat_ids(as_dicts(c)) for c in conversations]
    except (OSError, RuntimeError) as err:  # a server that cannot start or answer says nothing of the template
        return runtime_entry(name, [], None, why_not=f"llama-server could not be run ({err})")
    # a chat ending with an answer asks llama-server to continue that answer: the training ids up to its EOS
    want = [prompt_format.encode(c)[0][:-1 if c[-1].role == "assistant" else None] for c in conversations]
    edges = [c[-1].role == "assistant" and prompt_format.gap != "" and not isinstance(prompt_format, MistralControl)
             for c in conversations]
    return runtime_entry(name, want, got, edges, LLAMA_SERVER_EDGE)


# ---------------------------------------------------------------- Ollama


def ollama_render(template: str, system: str | None, conversations: list[Conversation], work_dir: Path,
                  legacy: bool = False) -> list[str]:
    """The text Ollama hands llama.cpp for each conversation (its Modelfile SYSTEM as Ollama adds it), rendered by
    Go's text/template as Ollama fills it (ollama_render.go); `legacy`: as Ollama versions without .Messages do."""
    binary = work_dir / "ollama_render"
    shutil.copyfile(OLLAMA_RENDER, work_dir / OLLAMA_RENDER.name)
    subprocess.run(["go", "build", "-o", str(binary), OLLAMA_RENDER.name], cwd=work_dir, check=True,
                   capture_output=True, text=True)
    cases = [{"messages": as_dicts(c), "system": system or "", "legacy": legacy} for c in conversations]
    result = subprocess.run([str(binary)], input=json.dumps({"template": template, "cases": cases}),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def with_modelfile_system(conversation: Conversation, system: str | None) -> Conversation:
    """What Ollama runs: the Modelfile's SYSTEM first when the request has no system message."""
    if system and (not conversation or conversation[0].role != "system"):
        return [Message("system", system), *conversation]
    return conversation


def check_ollama(template: str, system: str | None, gguf: Path, prompt_format: PromptFormat,
                 conversations: list[Conversation]) -> dict:
    name = "Ollama (Modelfile)"
    if shutil.which("go") is None:
        return runtime_entry(name, [], None, why_not="Go is not installed (apt-get install golang-go), which renders "
                                               "Ollama's TEMPLATE as Ollama does")
    try:
        with tempfile.TemporaryDirectory(prefix="ollama-render-") as work_dir:
            texts = ollama_render(template, system, conversations, Path(work_dir))
    except subprocess.CalledProcessError as err:  # Go could not build the renderer, or the template failed in it
        why = ((err.stderr or "").strip().splitlines() or [str(err)])[-1]
        if err.cmd[0] == "go":
            return runtime_entry(name, [], None, why_not=f"Go could not build {OLLAMA_RENDER.name}: {why}")
        return {"runtime": name, "not_checked": why, "problems": [f"{name}: the TEMPLATE fails in Go: {why}"]}
    try:
        # llama.cpp's tokenization of the texts, as Ollama hands them over (BOS added, special tokens parsed)
        got = isolate.run_isolated(f"llama.cpp's tokenizer on {gguf.name}", llama_cpp_vocab_facts, gguf,
                                   texts)["tokenized"]
    except (isolate.ChildCrashed, isolate.ChildFailed) as err:
        return {"runtime": name, "not_checked": str(err), "problems": [f"{name}: {err}"]}
    want = [prompt_format.encode(with_modelfile_system(c, system))[0] for c in conversations]
    edges = [isinstance(prompt_format, MistralControl) and any(m.role == "assistant" and m.content.endswith(" ")
                                                               for m in c) for c in conversations]
    return runtime_entry(name, want, got, edges, OLLAMA_EDGE)
