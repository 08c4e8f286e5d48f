"""Answers from a fine-tuned model: an adapter folder (base + LoRA), a merged model folder, or a GGUF file (with
--lora, a base GGUF with the adapter.gguf that export_gguf.py --lora_only writes).

Every backend is fed the same token ids, rendered by `PromptFormat` exactly as training rendered the prompt part of a
row; llama.cpp gets them through `Llama.generate(tokens)`, never its own tokenizer. Backends (qlora/engines.py):
Unsloth on a CUDA GPU (when installed), transformers (+ PEFT) otherwise, llama.cpp for `.gguf`. Heavy imports stay
inside the functions so that Unsloth can be imported before transformers and bad input fails before anything loads.

The prompt's pieces come from where the model was made: tokenizer.model from --tokenizer_name, else the model's own
(its folder; for a .gguf, beside it or in the merged/ folder that export_gguf.py writes next to it; with --lora, first
beside the adapter GGUF or in the adapter/ folder next to it), else the adapter's base or --model_name; template and
system prompt from the training run's config.yaml (see `run_settings`; near the --lora file when given), else
--template and none; --system overrides the system prompt.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import yaml

from .atomic import check_writable, write_text
from .chat import (Conversation, Message, PromptFormat, find_tokenizer_file, load_prompt_format, tokenizer_file_in,
                   unencodable)
from .config import FIELDS, SEED, ConfigError, saved_settings
from .device import pick_backend
from .engines import GPU_BATCH, InferError, adapter_base, load_engine

# Text a model that has not learned to stop writes after its answer; nothing from the first one on is shown.
MARKERS = ("[INST]", "[/INST]", "</s>", "### Instruction:", "### Response:")
ANSWERING = "answering on the CPU"  # what infer.py does where a GPU cannot be used
SAMPLING_SEED = 42  # --seed's default


def add_arguments(parser) -> None:
    parser.add_argument("model", help="training output / adapter folder, merged model folder, or .gguf file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this one prompt")
    mode.add_argument("--chat", action="store_true", help="multi-turn chat on stdin (/reset; /exit, /quit or "
                      "Ctrl-D ends)")
    mode.add_argument("--input", help="JSONL file, one {\"prompt\": ..., \"system\"?: ...} a line")
    parser.add_argument("--output", help="JSONL answers for --input, one a line, in order")
    parser.add_argument("--lora", help="LoRA adapter GGUF (export_gguf.py --lora_only's adapter.gguf) applied to "
                        "MODEL, a .gguf of its base")
    parser.add_argument("--system", help="system message (default: the training run's system_prompt)")
    parser.add_argument("--seed", type=int, default=SAMPLING_SEED, help="sampling seed (default: %(default)s)")
    parser.add_argument("--compare_base", action="store_true",
                        help="also answer with the adapter's base model, without the adapter")
    parser.add_argument("--batch_size", type=positive_int, help=f"prompts per generate call for --input, left-padded "
                        f"(default: {GPU_BATCH} on a GPU, 1 otherwise)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# ---------------------------------------------------------------- what the model path is


def model_kind(path: Path) -> str:
    """"gguf", "adapter" (adapter_config.json) or "merged" (config.json + safetensors)."""
    if not path.exists():
        raise InferError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise InferError(f"{path}: not a .gguf file; give a .gguf file, an adapter folder or a merged model folder")
    if (path / "adapter_config.json").is_file():
        from .model import WeightsError, check_safetensors_adapter

        try:
            check_safetensors_adapter(path)
        except (FileNotFoundError, WeightsError) as err:
            raise InferError(str(err)) from None
        return "adapter"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "merged"
    raise InferError(f"{path}: neither an adapter folder (adapter_config.json) nor a model folder "
                     f"(config.json + *.safetensors)")


def tokenizer_file(path: Path, kind: str, config, lora: Path | None = None) -> Path:
    """--tokenizer_name's if given; else the model's own tokenizer file (tokenizer.model, or Tekken's tokenizer.json):
    in its folder, or for a .gguf beside it or in the merged/ folder export_gguf.py writes next to it (with --lora,
    first beside the adapter GGUF or in the adapter/ folder export_gguf.py --lora_only writes next to it); else the
    adapter's base's, or --model_name's."""
    if kind == "gguf":
        folders = [lora.parent, lora.parent / "adapter"] if lora else []
        folders += [path.parent, path.parent / "merged"]
    else:
        folders = [path]
    found = [f for f in map(tokenizer_file_in, folders) if f is not None]
    if found and not config.tokenizer_name:
        return found[0]
    source = config.tokenizer_name or (adapter_base(path) if kind == "adapter" else config.model_name)
    return find_tokenizer_file(source, instead=f"pass --tokenizer_name PATH to a folder with the tokenizer.model "
                                               f"(or Tekken's tokenizer.json) of {path}")


def run_settings(path: Path) -> dict:
    """The training run's config.yaml (its template and system prompt): train_unsloth.py writes it beside the adapter,
    and export_gguf.py's merged/ folder and .gguf files sit one or two folders below that by default. Without one,
    the nearest config.yaml (export_gguf.py writes its own beside the .gguf files)."""
    start = path.parent if path.is_file() else path
    found = [f / "config.yaml" for f in (start, start.parent, start.parent.parent) if (f / "config.yaml").is_file()]
    for run in [f for f in found if (f.parent / "adapter_config.json").is_file()] + found:
        try:
            return saved_settings(run)
        except ConfigError as err:  # some other tool's config.yaml: not ours to judge
            print(f"note: not using {run}: {err}", file=sys.stderr)
    return {}


def prompt_settings(path: Path, config, system: str | None) -> tuple[str, str | None]:
    """(template, system prompt) as the run's config.yaml has them: --system wins over its system prompt; without
    one, --template (or --config's, or the default) and no system prompt."""
    trained = run_settings(path)
    template = trained.get("template", config.template)
    if system is None:
        system = trained.get("system_prompt")
    return template, (system.strip() or None) if system else None


# ---------------------------------------------------------------- ids to text


def _partial_marker(text: str) -> int:
    """Length of the longest start of a marker that `text` ends with (it may become the marker)."""
    return max((k for m in MARKERS for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def _settled(text: str) -> str:
    """The part of the text so far that no later token can change: not an incomplete UTF-8 character (SentencePiece
    decodes it as U+FFFD until its last byte comes), not trailing space, not what may be the start of a marker."""
    text = text.split("\ufffd", 1)[0]
    while True:
        trimmed = text.rstrip()
        trimmed = trimmed[: len(trimmed) - _partial_marker(trimmed)]
        if trimmed == text:
            return text
        text = trimmed


def _cut(text: str) -> tuple[str, bool]:
    """The answer in `text`, and whether a marker ended it."""
    at = min((i for i in (text.find(m) for m in MARKERS) if i >= 0), default=-1)
    return (text[:at].rstrip(), True) if at >= 0 else (text.rstrip(), False)


def answer_text(fmt: PromptFormat, ids: list[int]) -> str:
    return _cut(fmt.decode(ids))[0]


class TextStream:
    """Generated ids in, printable text out, as it becomes final; the pieces add up to `answer_text` of the ids."""

    def __init__(self, fmt: PromptFormat):
        self.fmt, self.ids, self.shown, self.ended = fmt, [], "", False

    def add(self, token: int) -> str:
        """The new text that `token` makes final; `ended` turns true when a marker appears."""
        self.ids.append(token)
        text, self.ended = _cut(self.fmt.decode(self.ids))
        return self._show(text if self.ended else _settled(text))

    def finish(self) -> str:
        return self._show(answer_text(self.fmt, self.ids))

    @property
    def answer(self) -> str:
        return answer_text(self.fmt, self.ids)

    def _show(self, text: str) -> str:
        piece = text[len(self.shown):] if len(text) > len(self.shown) else ""
        self.shown += piece
        return piece


# ---------------------------------------------------------------- answering


class Session:
    """One loaded model and its prompt format; answers conversations, streamed or in batches."""

    def __init__(self, engine, fmt: PromptFormat, config, compare_base: bool = False):
        self.engine, self.fmt, self.config, self.compare_base = engine, fmt, config, compare_base

    def reply(self, conversation: Conversation, out) -> str:
        """Stream the answer (with --compare_base, the base's first) to `out`; return the fine-tuned answer."""
        ids = self.fmt.prompt_ids(conversation)
        if self.compare_base:
            out.write("[base]\n")
            with self.engine.base():
                self.stream(ids, out)
            out.write("[fine-tuned]\n")
        return self.stream(ids, out)

    def stream(self, ids: list[int], out) -> str:
        text = TextStream(self.fmt)

        def on_token(token: int) -> bool:
            out.write(text.add(token))
            out.flush()
            return text.ended

        self.engine.generate([ids], self.config, on_token)
        out.write(text.finish() + "\n")
        out.flush()
        return text.answer

    def answers(self, conversations: list[Conversation], batch_size: int, base: bool = False) -> list[str]:
        prompts = [self.fmt.prompt_ids(c) for c in conversations]
        generated = []
        with self.engine.base() if base else nullcontext():
            for start in range(0, len(prompts), batch_size):
                generated += self.engine.generate(prompts[start : start + batch_size], self.config)
        return [answer_text(self.fmt, ids) for ids in generated]


def opening(system: str | None) -> Conversation:
    return [Message("system", system)] if system else []


def conversation(prompt: str, system: str | None, where: str = "--prompt") -> Conversation:
    """Contents stripped, as data preparation strips them, so that the ids match training's. Text no tokenizer takes
    is refused naming `where` it came from."""
    for text, what in ((prompt, where), (system, "the system message")):
        problem = unencodable(text or "")
        if problem:
            raise InferError(f"{what}: {problem}; give the text again as UTF-8")
    return opening(system) + [Message("user", prompt.strip())]


# Lines that end the chat rather than go to the model: ours, Ollama's /bye, and the bare words other chat shells take
EXIT_WORDS = ("/exit", "/quit", "/bye", "exit", "quit")


def chat(session: Session, system: str | None) -> None:
    """Multi-turn chat on stdin: each answer joins the history, as it would in a training row."""
    print("chat: /reset clears the history; /exit, /quit or Ctrl-D ends", file=sys.stderr)
    prompt = ""
    # bytes that are not UTF-8 become lone surrogates, refused line by line below, instead of a UnicodeDecodeError
    # that would end the chat and its history
    sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)

        prompt = "> "
    history = opening(system)
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            if prompt:  # Ctrl-D at the prompt: the shell's own prompt goes on a line of its own
                print(flush=True)
            return
        if line.lower() in EXIT_WORDS:
            return
        if line == "/reset":
            history = opening(system)
            print("(history cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            turn = history + conversation(line, None, "this line")
            answer = session.reply(turn, sys.stdout)
        except InferError as err:  # too long for the context, or not text: the turn is dropped, the chat goes on
            print(f"error: {err}; /reset to start over", file=sys.stderr)
            continue
        history = turn + [Message("assistant", answer)]


def read_prompts(path: Path, system: str | None) -> list[tuple[dict, Conversation]]:
    """(record, conversation) for each non-blank line; every problem names file:line."""
    if not path.is_file():
        raise InferError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # as data_prep reads: a byte-order mark is not content
    except UnicodeDecodeError as err:
        raise InferError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InferError(f"{path}:{number}: malformed JSON: {err.msg}") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InferError(f"{path}:{number}: needs a non-empty text field 'prompt'")
        rows.append((record, conversation(prompt, record.get("system", system), f"{path}:{number}: the prompt")))
    if not rows:
        raise InferError(f"{path}: no prompts")
    return rows


def settings_path(output: Path) -> Path:
    """Where the settings the answers came from go: answers.jsonl -> answers.config.yaml."""
    return output.with_name(f"{output.stem}.config.yaml")


def batch(session: Session, rows, output: Path, batch_size: int, settings: dict) -> None:
    """Each input record with its "answer" (and "base_answer"), in input order, written whole or not at all; the
    settings they came from beside them."""
    conversations = [c for _, c in rows]
    answers = session.answers(conversations, batch_size)
    base = session.answers(conversations, batch_size, base=True) if session.compare_base else None
    lines = []
    for i, (record, _) in enumerate(rows):
        record = {**record, "answer": answers[i]} | ({"base_answer": base[i]} if base else {})
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_text(settings_path(output), yaml.safe_dump({**settings, "batch_size": batch_size}, sort_keys=False))
    write_text(output, "".join(lines))
    print(f"wrote {len(lines)} answers to {output} (settings in {settings_path(output)})", file=sys.stderr)


def check_vocabulary(engine, fmt: PromptFormat, tokenizer: Path) -> None:
    if engine.vocab_size != fmt.vocab_size or engine.eos != fmt.eos:
        raise InferError(f"{tokenizer} ({fmt.vocab_size} tokens, EOS {fmt.eos}) is not this model's "
                         f"tokenizer ({engine.vocab_size} tokens, EOS {engine.eos}); pass --tokenizer_name")


def check_lora(lora: Path, kind: str) -> None:
    """A LoRA adapter GGUF for a .gguf base, read with gguf-py first: llama.cpp accepts some files that are not
    adapters and then crashes evaluating them."""
    from gguf import GGUFReader

    if kind != "gguf":
        raise InferError("--lora goes with a .gguf MODEL, its base; an adapter folder is itself the MODEL")
    if not lora.is_file():
        raise InferError(f"--lora {lora}: no such file")
    try:
        adapter_type = GGUFReader(lora).fields.get("adapter.type")
    except ValueError:  # not a GGUF at all ("GGUF magic invalid")
        adapter_type = None
    if adapter_type is None or adapter_type.contents() != "lora":
        raise InferError(f"--lora {lora}: not a LoRA adapter GGUF (export_gguf.py --lora_only writes one)")


def open_session(path: Path, config, template: str, seed: int = SAMPLING_SEED, compare_base: bool = False,
                 lora: Path | None = None) -> Session:
    """The model at `path` (with the LoRA GGUF `lora`) loaded on its backend, with the tokenizer its prompts are
    rendered with."""
    kind = model_kind(path)
    if compare_base and kind != "adapter":
        raise InferError(f"--compare_base needs an adapter folder; {path} has no separate base model")
    if lora:
        check_lora(lora, kind)
    tokenizer = tokenizer_file(path, kind, config, lora)
    fmt = load_prompt_format(tokenizer, template)
    engine = load_engine(path, kind, "gguf" if kind == "gguf" else pick_backend(config.backend, ANSWERING), fmt.eos,
                         seed, lora)
    check_vocabulary(engine, fmt, tokenizer)
    return Session(engine, fmt, config, compare_base)


def answer_settings(config, args, template: str, system: str | None) -> dict:
    """The model, prompt and sampling settings that --input's answers come from, as they were resolved."""
    path, kind = Path(args.model), model_kind(Path(args.model))
    sampling = {name: getattr(config, name) for name, f in FIELDS.items() if f.metadata["group"] == "infer"}
    return {"model": args.model, "base_model": adapter_base(path) if kind == "adapter" else None, "lora": args.lora,
            "backend": "llama.cpp" if kind == "gguf" else pick_backend(config.backend, ANSWERING), "template": template,
            "system": system, "seed": args.seed, **sampling}


def run(config, args) -> None:
    """Check the arguments, load the model, answer in the mode asked for."""
    path, lora = Path(args.model), Path(args.lora) if args.lora else None
    if args.prompt is not None and not args.prompt.strip():
        raise InferError("--prompt is empty")
    if args.system and unencodable(args.system):
        raise InferError(f"--system: {unencodable(args.system)}; give the text again as UTF-8")
    if not SEED.ok(args.seed):
        raise InferError(f"--seed must be {SEED.must}, got {args.seed}")
    if args.input and not args.output:
        raise InferError("--input needs --output")
    if args.output:  # checked before the model loads, not after every answer is generated
        if Path(args.output).is_dir():
            raise InferError(f"--output {args.output}: is a folder; give a file name, such as "
                             f"{Path(args.output) / 'answers.jsonl'}")
        check_writable(Path(args.output).parent)
    template, system = prompt_settings(lora or path, config, args.system)  # the fine-tune's settings
    rows = read_prompts(Path(args.input), system) if args.input else None
    session = open_session(path, config, template, args.seed, args.compare_base, lora)
    if args.chat:
        chat(session, system)
    elif args.input:
        batch(session, rows, Path(args.output), args.batch_size or session.engine.batch_size,
              answer_settings(config, args, template, system))
    else:
        session.reply(conversation(args.prompt, system), sys.stdout)
