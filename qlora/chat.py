"""Conversations to token ids, exactly as Mistral's own tokenizer library (mistral-common, v1) makes them.

Mistral renders `<s>▁[INST]▁{user}▁[/INST]▁{answer}</s>▁[INST]…`: every segment is encoded by SentencePiece on its
own, so each gets SentencePiece's leading `▁`. The Hugging Face chat template of the same tokenizer renders the text
first and tokenizes it once, which loses that `▁` after `<s>` and before each answer, and the `tokenizers` port of the
model also splits runs of spaces differently. llama.cpp and Ollama follow Mistral, so training on Hugging Face's ids
would put the fine-tune one token away from its own prompt at inference. Hence SentencePiece itself, on the model's
`tokenizer.model`, for training and for inference prompts alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece

from .config import CHOICES
from .hub import HubError, fetching

IGNORE = -100
TEMPLATES = CHOICES["template"]

# Mistral-Instruct v0.2's own Hugging Face chat template, stored with the tokenizer and in GGUF metadata so that other
# tools render the same text; our ids come from `PromptFormat`, not from rendering this.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


Conversation = list[Message]


def find_tokenizer_model(model_name: str, tokenizer_name: str | None = None, instead: str | None = None) -> Path:
    """The SentencePiece `tokenizer.model` of a local folder or hub repo (the file every Mistral 7B repo ships).
    A source that cannot be had is a HubError saying what to do: `instead`, else the flag to pass a folder with."""
    source = tokenizer_name or model_name
    local = Path(source) / "tokenizer.model"
    if local.is_file():
        return local
    if Path(source).exists():
        raise HubError(f"{source}: no tokenizer.model in this folder; pass --tokenizer_name with one")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if instead is None:
        instead = ("pass --tokenizer_name PATH to a local folder with its tokenizer.model" if tokenizer_name else
                   "pass --model_name PATH to a local folder with the model (or --tokenizer_name PATH to one with "
                   "its tokenizer.model)")
    with fetching(source, "tokenizer" if tokenizer_name else "model", instead):
        try:
            return Path(hf_hub_download(source, "tokenizer.model"))
        except RemoteEntryNotFoundError:
            raise HubError(f"{source} has no tokenizer.model on the hub; pass --tokenizer_name PATH to a folder or "
                           f"repository with Mistral's tokenizer.model") from None


class PromptFormat:
    """Renders conversations to (ids, labels) for training and to prompt ids for inference, with the same code."""

    def __init__(self, tokenizer_model: str | Path, template: str = "mistral"):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
        self.template = template
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()

    def _user_text(self, content: str) -> str:
        if self.template == "mistral":
            return f"[INST] {content} [/INST]"
        return f"### Instruction:\n{content}\n\n### Response:\n"

    def _segments(self, conversation: Conversation):
        """(ids, trained) pieces in order. Mistral v1 merges a system message into the first user turn."""
        system = conversation[0].content if conversation and conversation[0].role == "system" else None
        turns = conversation[1:] if system is not None else conversation
        yield [self.bos], False
        for i, message in enumerate(turns):
            if message.role == "user":
                content = f"{system}\n\n{message.content}" if (i == 0 and system) else message.content
                yield self.sp.encode(self._user_text(content)), False
            else:
                yield self.sp.encode(message.content) + [self.eos], True

    def encode(self, conversation: Conversation, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its labels (prompt tokens are IGNORE unless train_on_prompt)."""
        ids, labels = [], []
        for piece, trained in self._segments(conversation):
            ids += piece
            labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
        return ids, labels

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Ids of a conversation that ends with a user turn: the exact prefix its training row has before the answer."""
        if not conversation or conversation[-1].role != "user":
            raise ValueError("a prompt must end with a user message")
        return self.encode(conversation)[0]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos, self.eos)])
