"""Prompt rendering against Mistral's own tokenizer library: the ids we train on are the ids mistral-common makes.

mistral-common's v1 instruct tokenizer (Mistral 7B Instruct's) is the reference; it strips nothing, so raw contents
are compared with it directly, and the data path (which strips contents) with the stripped contents.
"""

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from qlora.chat import IGNORE, Message
from qlora.data import prepare_rows

# (user, answer) turns
CASES = {
    "one turn": [("What is the capital of Arvenia?", "The capital of Arvenia is Lumeport.")],
    "two turns": [("Hi  there,  two  spaces", "Hello  back"),
                  ("line one\nline two\n\n  indented line", "ok:\n- a\n- b\n")],
    "three turns": [("say <s> and [INST] literally", "sure: </s> [/INST] <<SYS>>"),
                    ("héllo 日本語 🎉 naïve “quoted” — dash", "ça va, 你好 👍"),
                    ("  padded inside  ", "\talso padded \n")],
    "trailing newline": [("Write a haiku.\n", "\nold pond\nfrog jumps in\nsplash\n\n")],
}
SYSTEMS = {"no system": None, "system": "You are terse.\nAnswer in  one line."}


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer.v1().instruct_tokenizer


def mistral_ids(mistral, turns, system, final_user=None):
    """mistral-common's ids for (user, answer) turns, optionally followed by an unanswered user message."""
    messages = []
    for user, answer in turns:
        messages += [UserMessage(content=user), AssistantMessage(content=answer)]
    if final_user is not None:
        messages.append(UserMessage(content=final_user))
    return mistral.encode_instruct(InstructRequest(messages=messages, system_prompt=system)).tokens


def conversation(turns, system, final_user=None) -> list[Message]:
    messages = [Message("system", system)] if system else []
    for user, answer in turns:
        messages += [Message("user", user), Message("assistant", answer)]
    if final_user is not None:
        messages.append(Message("user", final_user))
    return messages


cases = pytest.mark.parametrize("turns", CASES.values(), ids=CASES.keys())
systems = pytest.mark.parametrize("system", SYSTEMS.values(), ids=SYSTEMS.keys())


@cases
@systems
def test_training_ids_are_mistral_commons(prompt_format, mistral, turns, system):
    ids, _ = prompt_format.encode(conversation(turns, system))
    assert ids == mistral_ids(mistral, turns, system)


@cases
@systems
def test_prompt_ids_are_mistral_commons_and_prefix_the_training_row(prompt_format, mistral, turns, system):
    full = mistral_ids(mistral, turns, system)
    for k, (user, _) in enumerate(turns):
        prompt = prompt_format.prompt_ids(conversation(turns[:k], system, final_user=user))
        assert prompt == mistral_ids(mistral, turns[:k], system, final_user=user)
        assert full[: len(prompt)] == prompt


@cases
@systems
def test_labels_mask_exactly_the_prompt(prompt_format, mistral, turns, system):
    """Expected labels from mistral-common alone: the tokens each answer adds (answer + EOS) are trained."""
    expected, done = [], 0
    for k, (user, _) in enumerate(turns):
        asked = len(mistral_ids(mistral, turns[:k], system, final_user=user))
        answered = mistral_ids(mistral, turns[: k + 1], system)
        expected += [IGNORE] * (asked - done) + answered[asked:]
        done = len(answered)
    ids, labels = prompt_format.encode(conversation(turns, system))
    assert labels == expected
    assert all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != IGNORE)
    assert labels[-1] == prompt_format.eos
    assert sum(label != IGNORE for label in labels) >= len(turns) * 2  # every answer has text and EOS

    all_ids, all_labels = prompt_format.encode(conversation(turns, system), train_on_prompt=True)
    assert (all_ids, all_labels) == (ids, ids)


@cases
@systems
def test_data_path_strips_contents_then_matches_mistral_common(prompt_format, mistral, turns, system):
    """What users feed in ('messages' rows) goes through `normalize`, which strips every content."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    prepared = prepare_rows([("chat.jsonl:1", {"messages": messages})], "auto", prompt_format, 4096, False, 0.0, 0,
                            False, "chat.jsonl")
    stripped = [(user.strip(), answer.strip()) for user, answer in turns]
    assert prepared.train == [{"input_ids": mistral_ids(mistral, stripped, system and system.strip()),
                               "labels": prompt_format.encode(conversation(stripped, system))[1]}]


def test_prompt_must_end_with_a_user_turn(prompt_format):
    with pytest.raises(ValueError, match="user"):
        prompt_format.prompt_ids(conversation([("q", "a")], None))


def test_decode_gives_back_the_answer(prompt_format):
    ids, labels = prompt_format.encode(conversation(CASES["three turns"][1:2], None))
    assert prompt_format.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == "ça va, 你好 👍"


def test_hugging_face_chat_template_gives_other_ids(tiny_model, prompt_format, mistral):
    """Why we render with SentencePiece instead of `apply_chat_template`: the template renders one string and
    tokenizes it once, so the `▁` Mistral's per-segment encoding puts after <s> and before each answer is lost."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    turns = [("Hi there", "Hello!"), ("How are you?", "Fine.")]
    chat = [{"role": r, "content": c} for user, answer in turns for r, c in (("user", user), ("assistant", answer))]
    hf_ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    ours, _ = prompt_format.encode(conversation(turns, None))
    assert ours == mistral_ids(mistral, turns, None)
    assert hf_ids != ours
    assert hf_ids[0] == ours[0] == prompt_format.bos
    hf_pieces, our_pieces = tokenizer.convert_ids_to_tokens(hf_ids), tokenizer.convert_ids_to_tokens(ours)
    assert (hf_pieces[1], our_pieces[1]) == ("[", "▁[")  # after <s>
    assert "Hello" in hf_pieces and "▁Hello" in our_pieces and "Hello" not in our_pieces  # the first answer
