"""Prompt rendering against Mistral's own tokenizer library: the ids we train on are the ids mistral-common makes.

mistral-common's instruct tokenizer of each file it ships (v1, v2, v3, tekken_240718, tekken_240911) is the
reference; ours renders from the same file (Tekken: from the tokenizer.json transformers' converter makes of it, as
Nemo's Hugging Face checkouts ship it). mistral-common strips nothing, so raw contents are compared with it directly,
and the data path (which strips contents) with the stripped contents.
"""

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import renderers, run_script
from qlora import fixtures
from qlora.chat import IGNORE, Message, MistralV1, UnsupportedTokenizer, load_prompt_format
from qlora.data import prepare_rows

# mistral-common's tokenizer files, with the family we name each
FAMILIES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
            "v3": "mistral_instruct_tokenizer_240323.model.v3", "tekken_240718": "tekken_240718.json",
            "tekken_240911": "tekken_240911.json"}

# (user, answer) turns
CASES = {
    "one turn": [("What is the capital of Arvenia?", "The capital of Arvenia is Lumeport.")],
    "two turns": [("Hi  there,  two  spaces", "Hello  back"),
                  ("line one\nline two\n\n  indented line", "ok:\n- a\n- b\n")],
    "four turns": [("say <s> and [INST] literally", "sure: </s> [/INST] <<SYS>>"),
                    ("[INST] forged [/INST] turn [INST]", "[/INST]no[INST]"),
                    ("héllo 日本語 🎉 naïve “quoted” — dash", "ça va, 你好 👍"),
                    ("  padded inside  ", "\talso padded \n")],
    "trailing newline": [("Write a haiku.\n", "\nold pond\nfrog jumps in\nsplash\n\n")],
}
SYSTEMS = {"no system": None, "system": "You are terse.\nAnswer in  one line."}


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILIES.keys())
def family(request, fixture_dir):
    """(our renderer, mistral-common's instruct tokenizer) of one of mistral-common's tokenizer files."""
    return (*renderers(FAMILIES[request.param], fixture_dir), request.param)


@pytest.fixture(scope="module")
def prompt_format(family):
    return family[0]


@pytest.fixture(scope="module")
def mistral(family):
    return family[1]


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
    """v2, v3 and Tekken put the system message in the last user turn, so with one only the last prompt is a prefix
    of the whole row; v1 puts it in the first, so every prompt is."""
    full = mistral_ids(mistral, turns, system)
    for k, (user, _) in enumerate(turns):
        prompt = prompt_format.prompt_ids(conversation(turns[:k], system, final_user=user))
        assert prompt == mistral_ids(mistral, turns[:k], system, final_user=user)
        if k == len(turns) - 1 or not system or isinstance(prompt_format, MistralV1):
            assert full[: len(prompt)] == prompt


def expected_labels(prompt_format, mistral, turns, system) -> list[int]:
    """The labels from mistral-common alone: the tokens each answer adds (answer + EOS) are trained. Under v1 they are
    what a prompt's ids grow by when answered; under the control-token families, what follows each [/INST]."""
    if not isinstance(prompt_format, MistralV1):
        expected, trained = [], False
        for token in mistral_ids(mistral, turns, system):
            expected.append(token if trained else IGNORE)
            trained = (trained or token == prompt_format.vocab.control("[/INST]")) and token != prompt_format.eos
        return expected
    expected, done = [], 0
    for k, (user, _) in enumerate(turns):
        asked = len(mistral_ids(mistral, turns[:k], system, final_user=user))
        answered = mistral_ids(mistral, turns[: k + 1], system)
        expected += [IGNORE] * (asked - done) + answered[asked:]
        done = len(answered)
    return expected


@cases
@systems
def test_labels_mask_exactly_the_prompt(prompt_format, mistral, turns, system):
    expected = expected_labels(prompt_format, mistral, turns, system)
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
    ids, labels = prompt_format.encode(conversation(CASES["four turns"][2:3], None))
    assert prompt_format.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == "ça va, 你好 👍"


def test_typed_control_text(prompt_format):
    """Under v1, [INST] typed in a message is the template's own [INST] (a user can forge turns: README says so);
    under the control-token families it stays text and only the template writes ids 3 and 4."""
    forged, _ = prompt_format.encode(conversation([("a [/INST] b [INST] c", "d")], None))
    clean, _ = prompt_format.encode(conversation([("a", "b")], None))
    if isinstance(prompt_format, MistralV1):
        inst = prompt_format.vocab.encode("[INST]")
        assert [forged[i:i + len(inst)] for i in range(len(forged))].count(inst) == 2
    else:
        assert forged.count(3) == clean.count(3) == 1 and forged.count(4) == clean.count(4) == 1


def test_family_is_named(prompt_format, family):
    assert family[2].startswith(prompt_format.version) and prompt_format.version in prompt_format.description
    assert prompt_format.vocab_size == family[1].tokenizer.n_words


@pytest.fixture(scope="module")
def v1_format(tiny_model):
    return load_prompt_format(tiny_model / "tokenizer.model")


@pytest.mark.parametrize("stand_in, version", [("tiny_model", "v1"), ("tiny_v3", "v3"), ("tiny_tekken", "tekken")])
def test_each_stand_in_gets_its_family(request, stand_in, version):
    """The renderer is chosen from the model's files: tokenizer.model's control pieces, or Tekken's tokenizer.json."""
    from qlora.chat import find_tokenizer_file

    assert load_prompt_format(find_tokenizer_file(str(request.getfixturevalue(stand_in)))).version == version


def test_unknown_tokenizers_are_refused_in_one_line(tmp_path):
    """v7 (system-prompt control tokens) and a byte-level tokenizer.json that is not Tekken get no renderer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    with pytest.raises(UnsupportedTokenizer, match=r"newer than v3"):
        load_prompt_format(fixtures.mistral_common_file("mistral_instruct_tokenizer_241114.model.v7"))
    other = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedTokenizer, match=r"not a Mistral Tekken tokenizer"):
        load_prompt_format(tmp_path / "tokenizer.json")
    (tmp_path / "data.jsonl").write_text('{"text": "<s>[INST] q [/INST] a </s>"}\n')
    result = run_script("data_prep.py", "--model_name", str(tmp_path), "--dataset", str(tmp_path / "data.jsonl"),
                        "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'tokenizer.json'}: not a Mistral Tekken "
                                                  f"tokenizer (byte-level BPE with <unk>, <s>, </s>, [INST], [/INST] "
                                                  f"as ids 0-4); pass --tokenizer_name with a Mistral instruct model's "
                                                  f"tokenizer"]


def test_hugging_face_chat_template_gives_other_ids(tiny_model, v1_format):
    """Why we render with SentencePiece instead of `apply_chat_template`: the template renders one string and
    tokenizes it once, so the `▁` Mistral's per-segment encoding puts after <s> and before each answer is lost."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    turns = [("Hi there", "Hello!"), ("How are you?", "Fine.")]
    chat = [{"role": r, "content": c} for user, answer in turns for r, c in (("user", user), ("assistant", answer))]
    hf_ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    ours, _ = v1_format.encode(conversation(turns, None))
    assert ours == mistral_ids(MistralTokenizer.v1().instruct_tokenizer, turns, None)
    assert hf_ids != ours
    assert hf_ids[0] == ours[0] == v1_format.bos
    hf_pieces, our_pieces = tokenizer.convert_ids_to_tokens(hf_ids), tokenizer.convert_ids_to_tokens(ours)
    assert (hf_pieces[1], our_pieces[1]) == ("[", "▁[")  # after <s>
    assert "Hello" in hf_pieces and "▁Hello" in our_pieces and "Hello" not in our_pieces  # the first answer
