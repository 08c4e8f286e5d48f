"""Conversations to token ids, exactly as Mistral's own tokenizer library (mistral-common) makes them, for each family
of Mistral instruct tokenizer:

- v1 (Mistral 7B Instruct v0.1/v0.2; SentencePiece, 32,000 tokens): `<s>▁[INST]▁{user}▁[/INST]▁{answer}</s>▁[INST]…`.
  `[INST]` is plain text, every segment is encoded by SentencePiece on its own (so each gets SentencePiece's leading
  `▁`), and the system message opens the first user turn. User text that spells `[INST]` gets the same ids.
- v2/v3 (Mixtral 8x22B, Mistral 7B Instruct v0.3; SentencePiece, 32,768 tokens): `<s>[INST]▁{user}[/INST]▁{answer}</s>`,
  with `[INST]` and `[/INST]` control tokens (ids 3 and 4) that no text encodes to, the system message in the last user
  turn, the answer's trailing spaces dropped.
- Tekken (Mistral Nemo, Pixtral; byte-level BPE, 131,072 tokens of which the first 1,000 are special): v3's rules over
  Tekken's vocabulary, which adds no leading space: `<s>[INST]{user}[/INST]{answer}</s>`.

The Hugging Face chat template renders the text first and tokenizes it once, which loses v1's `▁` after `<s>` and
before each answer. llama.cpp and Ollama follow Mistral, so training on Hugging Face's ids would put the fine-tune one
token away from its own prompt at inference. Hence the tokenizer's own segments, from the model's files: SentencePiece
on `tokenizer.model`, or Tekken's `tokenizer.json` (the file llama.cpp's converter reads too) through `tokenizers`.
mistral-common itself is only the tests' reference: the toolkit does not need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import CHOICES
from .hub import HubError, fetching

IGNORE = -100
TEMPLATES = CHOICES["template"]
SENTENCEPIECE, TOKENIZER_JSON = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE, TOKENIZER_JSON)  # the order a model's folder is searched in
# The ids every Mistral tokenizer starts with; v2, v3 and Tekken add the instruction markers as control tokens.
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>")
INST, END_INST = "[INST]", "[/INST]"

# The chat templates the export writes (`PromptFormat.chat_template`): Jinja that renders a conversation as the text
# whose tokenization gives the training ids, in transformers and vLLM (the merged folder's) and in llama.cpp, LM Studio
# and Jan (the GGUF's). Python's jinja2 and llama.cpp's own engine both run them, so they use only what both have.
# The system message is the first message, empty counting as none, as in `_split_system`; {lead} and {gap} are the
# text before a segment that follows a special token and before one that follows text (see `PromptFormat.chat_template`).
_TEMPLATE_HEAD = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
)
_TEMPLATE_ROLE_ERROR = ("{%- else %}{{ raise_exception('Mistral-Instruct takes a system message first, then user and "
                        "assistant messages') }}{%- endif %}{%- endfor %}")
TEXT_TURNS_TEMPLATE = _TEMPLATE_HEAD + (  # v1 and the instruction template: the system message opens the first turn
    "{{- bos_token }}{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{{- {lead} + {before} + (system + '\n\n' if loop.first and system else '') + message['content'] + {after} }}"
    "{%- elif message['role'] == 'assistant' %}{{- {gap} + message['content'] + eos_token }}"
) + _TEMPLATE_ROLE_ERROR
CONTROL_TEMPLATE = _TEMPLATE_HEAD + (  # v2, v3, Tekken: control tokens, the system message in the last user turn
    "{%- set ns = namespace(last=-1) %}{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST]' + {lead} + (system + '\n\n' if loop.index0 == ns.last and system else '') + message['content']"
    " + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- {lead} + message['content'].rstrip(' ') + eos_token }}"
) + _TEMPLATE_ROLE_ERROR


@dataclass
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


Conversation = list[Message]


def unencodable(text: str) -> str | None:
    """Where `text` cannot be encoded (a lone surrogate: JSON's "\\ud800", or bytes that were not UTF-8 read with
    surrogateescape), said for an error line; None when it can. No tokenizer takes such text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"character {err.start + 1} ({ascii(text[err.start])}) is a lone surrogate, which is no text: not "
                f"valid UTF-8")
    return None


class UnsupportedTokenizer(HubError):
    """A tokenizer none of the renderers fits (caught wherever a HubError is): one line naming the file."""


# ---------------------------------------------------------------- the model's tokenizer file


def tokenizer_file_in(folder: Path) -> Path | None:
    """The tokenizer file a model folder renders prompts with: SentencePiece's, else Tekken's tokenizer.json."""
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


def find_tokenizer_file(model_name: str, tokenizer_name: str | None = None, instead: str | None = None) -> Path:
    """The tokenizer file (`tokenizer.model`, else `tokenizer.json`) of a local folder or hub repo. A source that
    cannot be had is a HubError saying what to do: `instead`, else the flag to pass a folder with."""
    source = tokenizer_name or model_name
    if Path(source).exists():
        found = tokenizer_file_in(Path(source))
        if found is None:
            raise HubError(f"{source}: no tokenizer.model or tokenizer.json in this folder; pass --tokenizer_name "
                           f"with one")
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if instead is None:
        instead = ("pass --tokenizer_name PATH to a local folder with its tokenizer.model or tokenizer.json"
                   if tokenizer_name else "pass --model_name PATH to a local folder with the model (or "
                   "--tokenizer_name PATH to one with its tokenizer.model or tokenizer.json)")
    with fetching(source, "tokenizer" if tokenizer_name else "model", instead):
        for name in TOKENIZER_FILES:
            try:
                return Path(hf_hub_download(source, name))
            except RemoteEntryNotFoundError:
                continue
    raise HubError(f"{source} has neither tokenizer.model nor tokenizer.json on the hub; pass --tokenizer_name PATH "
                   f"to a folder or repository with Mistral's tokenizer")


# ---------------------------------------------------------------- vocabularies: text <-> ids


class SentencePieceVocab:
    """`tokenizer.model`: each text encoded on its own gets SentencePiece's leading `▁`, as mistral-common's does."""

    gguf_tokenizer = "llama"  # how llama.cpp's converter records it in the GGUF

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # control pieces such as [INST] are never matched in text

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)

    def control(self, piece: str) -> int | None:
        """The id of `piece` when it is a control token of this model, else None."""
        token = self.sp.piece_to_id(piece)
        return token if token != self.sp.unk_id() and self.sp.is_control(token) else None


class TekkenVocab:
    """Tekken's byte-level BPE from its Hugging Face `tokenizer.json`; special tokens typed in text stay text."""

    gguf_tokenizer = "gpt2"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.encode_special_tokens = True  # "[INST]" in a user's text is text, as in mistral-common
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def piece(self, token: int) -> str:
        return self.tokenizer.id_to_token(token)

    def control(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)


def _tekken_shaped(path: Path) -> bool:
    """A tokenizer.json of Mistral's Tekken: byte-level BPE with Mistral's special tokens (and [INST]/[/INST]) first."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    added = {t.get("id"): t.get("content") for t in spec.get("added_tokens", []) if isinstance(t, dict)}
    pre = json.dumps(spec.get("pre_tokenizer"))
    return (spec.get("model", {}).get("type") == "BPE" and '"ByteLevel"' in pre and '"Split"' in pre
            and [added.get(i) for i in range(5)] == [*MISTRAL_SPECIALS, INST, END_INST])


def read_vocab(path: Path) -> tuple[SentencePieceVocab | TekkenVocab, str]:
    """The vocabulary of a tokenizer file and its Mistral family: "v1", "v2", "v3" or "tekken". Anything else (v7's
    system-prompt tokens, a tokenizer.json that is not Tekken, another model's tokenizer) is refused in one line."""
    path = Path(path)
    if path.name.endswith(".json"):
        if not _tekken_shaped(path):
            raise UnsupportedTokenizer(f"{path}: not a Mistral Tekken tokenizer (byte-level BPE with <unk>, <s>, </s>, "
                                       f"[INST], [/INST] as ids 0-4); pass --tokenizer_name with a Mistral instruct "
                                       f"model's tokenizer")
        return TekkenVocab(path), "tekken"
    vocab = SentencePieceVocab(path)
    sp = vocab.sp
    if [sp.id_to_piece(i) for i in range(3)] != list(MISTRAL_SPECIALS) or (sp.bos_id(), sp.eos_id()) != (1, 2):
        raise UnsupportedTokenizer(f"{path}: not a Mistral tokenizer (<unk>, <s>, </s> are not ids 0-2); pass "
                                   f"--tokenizer_name with a Mistral instruct model's tokenizer")
    if vocab.control(INST) is None:
        return vocab, "v1"
    if (vocab.control(INST), vocab.control(END_INST)) != (3, 4) or vocab.control("[SYSTEM_PROMPT]") is not None:
        raise UnsupportedTokenizer(f"{path}: a Mistral tokenizer newer than v3 (system-prompt control tokens); "
                                   f"v1, v2, v3 and Tekken are supported")
    return vocab, "v3" if vocab.control("[IMG]") is not None else "v2"


# ---------------------------------------------------------------- renderers


class PromptFormat:
    """Renders conversations to (ids, labels) for training and to prompt ids for inference, with the same code.
    Each family's subclass says how a conversation becomes segments (`_segments`); `load_prompt_format` picks it."""

    control_pieces: tuple[str, ...] = ()  # the control tokens this renderer writes, besides BOS and EOS

    def __init__(self, vocab: SentencePieceVocab | TekkenVocab, version: str):
        self.vocab, self.version = vocab, version
        self.bos, self.eos = vocab.control(MISTRAL_SPECIALS[1]), vocab.control(MISTRAL_SPECIALS[2])
        self.controls = {self.bos, self.eos} | {vocab.control(p) for p in self.control_pieces}

    @property
    def description(self) -> str:
        """The tokenizer family and its vocabulary, as the data report names them: "v3 (32768 tokens)"."""
        return f"{self.version} ({self.vocab.size} tokens)"

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def _segments(self, conversation: Conversation):
        """(ids, trained) pieces in order, after BOS."""
        raise NotImplementedError

    @property
    def gap(self) -> str:
        """The text a segment gets before it: each segment is encoded alone, and SentencePiece starts each with `▁`
        (a space); Tekken adds nothing."""
        return " " if isinstance(self.vocab, SentencePieceVocab) else ""

    def chat_template(self, space_after_special: bool) -> str:
        """The Jinja chat template whose text, tokenized by a runtime, gives this renderer's ids. A segment that
        follows a special token gets its space written out only for a tokenizer that does not add it there itself
        (`space_after_special`): llama.cpp adds it after every special token (the GGUF's add_space_prefix),
        transformers' tokenizer of Mistral's tokenizer.model does not."""
        lead = self.gap if space_after_special else ""
        return self._template(_literal(lead), _literal(self.gap))

    def _template(self, lead: str, gap: str) -> str:
        raise NotImplementedError

    def encode(self, conversation: Conversation, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its labels (prompt tokens are IGNORE unless train_on_prompt)."""
        ids, labels = [self.bos], [self.bos if train_on_prompt else IGNORE]
        for piece, trained in self._segments(conversation):
            ids += piece
            labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
        return ids, labels

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Ids of a conversation that ends with a user turn: what its training row has before the last answer."""
        if not conversation or conversation[-1].role != "user":
            raise ValueError("a prompt must end with a user message")
        return self.encode(conversation)[0]

    def text(self, ids: list[int], spell: set[int] | None = None) -> str:
        """`ids` as text, each control token in `spell` (default: all, BOS and EOS included) spelled out and the text
        between them decoded run by run: what the tokenizer gives back these ids from (llama.cpp with special tokens
        parsed, as Ollama feeds it)."""
        spell = self.controls if spell is None else spell
        text, run = "", []
        for token in ids + [None]:
            if token in self.controls or token is None:
                text += self.vocab.decode(run) + (self.vocab.piece(token) if token in spell else "")
                run = []
            else:
                run.append(token)
        return text

    def decode(self, ids: list[int]) -> str:
        """Generated text: BOS and EOS dropped, other control tokens spelled (so that a marker shows where a model
        that has not learned to stop starts the next turn)."""
        return self.text(ids, spell=self.controls - {self.bos, self.eos})


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are a subset of those both engines read)."""
    return json.dumps(text, ensure_ascii=False)


def _split_system(conversation: Conversation) -> tuple[str | None, Conversation]:
    if conversation and conversation[0].role == "system":
        return conversation[0].content, conversation[1:]
    return None, conversation


class TextTurns(PromptFormat):
    """User turns wrapped in markers written as text (`user_turn`), each segment encoded alone; the system message
    opens the first user turn."""

    user_turn: str

    def _template(self, lead: str, gap: str) -> str:
        before, after = self.user_turn.split("{content}")
        return (TEXT_TURNS_TEMPLATE.replace("{lead}", lead).replace("{gap}", gap)
                .replace("{before}", _literal(before)).replace("{after}", _literal(after)))

    def _segments(self, conversation: Conversation):
        system, turns = _split_system(conversation)
        for i, message in enumerate(turns):
            if message.role == "user":
                content = f"{system}\n\n{message.content}" if (i == 0 and system) else message.content
                yield self.vocab.encode(self.user_turn.format(content=content)), False
            else:
                yield self.vocab.encode(message.content) + [self.eos], True


class MistralV1(TextTurns):
    """v1: `[INST] {user} [/INST]` as text."""

    user_turn = "[INST] {content} [/INST]"


class MistralControl(PromptFormat):
    """v2, v3 and Tekken: `[INST]`/`[/INST]` control tokens around the user's text; the system message opens the
    last user turn; the answer without trailing spaces."""

    control_pieces = (INST, END_INST)

    def _template(self, lead: str, gap: str) -> str:
        return CONTROL_TEMPLATE.replace("{lead}", lead)

    def _segments(self, conversation: Conversation):
        system, turns = _split_system(conversation)
        last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=None)
        inst, end_inst = self.vocab.control(INST), self.vocab.control(END_INST)
        for i, message in enumerate(turns):
            if message.role == "user":
                content = f"{system}\n\n{message.content}" if (i == last_user and system) else message.content
                yield [inst, *self.vocab.encode(content), end_inst], False
            else:
                yield self.vocab.encode(message.content.rstrip(" ")) + [self.eos], True


class Instruction(TextTurns):
    """`### Instruction:` / `### Response:` as text on any Mistral tokenizer."""

    user_turn = "### Instruction:\n{content}\n\n### Response:\n"


def load_prompt_format(tokenizer_file: str | Path, template: str = "mistral") -> PromptFormat:
    """The renderer for a tokenizer file, chosen from what the file is (see `read_vocab`): the one place that
    decides."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    vocab, version = read_vocab(Path(tokenizer_file))
    if template == "instruction":
        return Instruction(vocab, version)
    return (MistralV1 if version == "v1" else MistralControl)(vocab, version)
