"""Preference pairs against Mistral's own tokenizer library: in every shape pairs are read in, the prompt's ids are
mistral-common's ids of the prompt, and prompt + answer its ids of the answered conversation; only the answers are
trained (DPO's completion mask, ORPO's labels); bad and unusable pairs are dropped and counted; data_prep.py says
what it kept.

mistral-common strips nothing and the data path strips every content, so the expected ids are mistral-common's of the
stripped contents (as in test_chat.py's data-path test).
"""

import json
import re

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest

from conftest import one_line_error, renderers, run_script
from qlora.chat import IGNORE, load_prompt_format
from qlora.config import Config
from qlora.data import DataError, load_prepared, prepared_kind
from qlora.prepare import first_record, holds_pairs, prepare_dataset
from qlora.orpo import orpo_row
from qlora.pairs import PairColumns, detect_pair_format, encode_pair, pair_format, prepare_pairs, to_pair

# mistral-common's tokenizer files of the families pairs are checked on
FAMILIES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
            "tekken": "tekken_240911.json"}

# (system, earlier (user, answer) turns, the user message both answers reply to, chosen, rejected); the padding
# around contents is stripped by every reader
CASES = {
    "one turn": (None, [], " What is the capital of Arvenia?\n", " The capital of Arvenia is Lumeport. \n",
                 "Brightwater,  I think."),
    "system": ("You are terse.\nAnswer in  one line. ", [], "Name a colour.", "Violet.",
               "I like many colours:\n- violet\n- teal\n"),
    "multi-turn": (None, [("Add 2 and 3.", " 2 plus 3 is 5."), ("héllo 日本語 🎉", "ça va 👍\n")], "And 4 more?",
                   "That makes 9.", "That makes 10."),
    "system, multi-turn": ("Be brief.", [("Hi", "Hello! How can I help?")], "Count to three.\n", "1, 2, 3",
                           "one two"),
}


def chat(system, turns, user) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))] + [
        {"role": "user", "content": user}]


def answer(text) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def hh_text(turns, user, reply) -> str:
    return "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in [*turns, (user, reply)])


COLUMNS = PairColumns("question", "good", "bad", "persona")

# shape -> (writer of (record, --system_prompt), the format it is forced with, what auto-detection calls it,
# whether it holds earlier turns); a shape with no place for a system message takes it from --system_prompt
SHAPES = {
    "preference": (lambda s, t, u, c, r: ({"prompt": u, "chosen": c, "rejected": r}, s),
                   "preference", "preference", False),
    "preference conversational": (lambda s, t, u, c, r: ({"prompt": chat(s, t, u), "chosen": answer(c),
                                                          "rejected": answer(r)}, None),
                                  "preference", "preference", True),
    "preference_conversations": (lambda s, t, u, c, r: ({"prompt": u, "chosen": chat(s, t, u) + answer(c),
                                                         "rejected": chat(s, t, u) + answer(r), "score_chosen": 8.0},
                                                        None),
                                 "preference_conversations", "preference_conversations", True),
    "hh": (lambda s, t, u, c, r: ({"chosen": hh_text(t, u, c), "rejected": hh_text(t, u, r)}, s), "hh", "hh", True),
    "columns": (lambda s, t, u, c, r: ({"question": u, "good": c, "bad": r, "persona": s or ""}, None),
                COLUMNS, None, False),
}
SHAPE_CASES = [(shape, case) for shape, (_, _, _, multi) in SHAPES.items() for case, (_, turns, *_) in CASES.items()
               if multi or not turns]


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILIES.keys())
def family(request, fixture_dir):
    """(our renderer, mistral-common's instruct tokenizer) of one of mistral-common's tokenizer files (Tekken: ours
    from the tokenizer.json transformers' converter makes of it, as in test_chat.py)."""
    return renderers(FAMILIES[request.param], fixture_dir)


@pytest.fixture(scope="module")
def prompt_format(family):
    return family[0]


@pytest.fixture(scope="module")
def mistral(family):
    return family[1]


def mistral_ids(mistral, system, turns, user, reply=None) -> list[int]:
    """mistral-common's ids of the stripped conversation: the prompt, or with `reply` the answered conversation."""
    messages = []
    for q, a in turns:
        messages += [UserMessage(content=q.strip()), AssistantMessage(content=a.strip())]
    messages.append(UserMessage(content=user.strip()))
    if reply is not None:
        messages.append(AssistantMessage(content=reply.strip()))
    return mistral.encode_instruct(InstructRequest(messages=messages, system_prompt=system and system.strip())).tokens


def expected_row(mistral, case) -> dict:
    system, turns, user, chosen, rejected = CASES[case]
    prompt = mistral_ids(mistral, system, turns, user)
    row = {"prompt_ids": prompt}
    for key, reply in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        whole = mistral_ids(mistral, system, turns, user, reply)
        assert whole[:len(prompt)] == prompt  # mistral-common's own prompt prefixes each answered conversation
        row[key] = whole[len(prompt):]
    return row


def prepare(records, fmt, prompt_format, max_seq_length=4096, skip_invalid=False, system_prompt=None):
    return prepare_pairs([(f"pairs.jsonl:{n}", r) for n, r in enumerate(records, start=1)], fmt, prompt_format,
                         max_seq_length, 0.0, 0, skip_invalid, "pairs.jsonl", system_prompt)


# ---------------------------------------------------------------- ids: every shape, every family


@pytest.mark.parametrize("shape, case", SHAPE_CASES, ids=[f"{s}: {c}" for s, c in SHAPE_CASES])
def test_pair_ids_are_mistral_commons(prompt_format, mistral, shape, case):
    """prompt_ids is mistral-common's prompt (the messages ending with the user's), prompt + each answer its
    conversation with that answer last, auto-detected or forced."""
    write, forced, detected, _ = SHAPES[shape]
    record, system_prompt = write(*CASES[case])
    expected = expected_row(mistral, case)
    for fmt in ([forced] if detected is None else ["auto", forced]):
        prepared = prepare([record], fmt, prompt_format, system_prompt=system_prompt)
        assert prepared.train == [expected]
        assert prepared.stats["format"] == (detected if fmt == "auto" else str(fmt))
    if detected is not None:
        assert detect_pair_format(record) == detected
    if system_prompt is None:
        assert encode_pair(to_pair(record, forced, "pairs.jsonl:1"), prompt_format) == expected


# ---------------------------------------------------------------- only the answers are trained


@pytest.fixture(scope="module")
def case_rows(prompt_format, mistral):
    """Every case prepared (in TRL's conversational shape), with the row mistral-common's ids give for it."""
    rows = []
    for case in CASES:
        record, _ = SHAPES["preference conversational"][0](*CASES[case])
        prepared = prepare([record], "auto", prompt_format)
        rows.append((prepared.train[0], expected_row(mistral, case)))
    return rows


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")  # orpo.py's own import
def test_orpo_labels_are_the_answers(prompt_format, case_rows):
    """ORPO's rows: prompt + answer as inputs, labels IGNORE exactly on the prompt and the answer's ids (its EOS too)
    after it; TRL's collator pads them without training the padding."""
    from trl.experimental.utils import DPODataCollatorWithPadding

    for row, expected in case_rows:
        columns = orpo_row(row)
        prompt = expected["prompt_ids"]
        assert columns["prompt_input_ids"] == prompt and columns["prompt_attention_mask"] == [1] * len(prompt)
        for key in ("chosen", "rejected"):
            reply = expected[f"{key}_ids"]
            assert columns[f"{key}_input_ids"] == prompt + reply
            assert columns[f"{key}_labels"] == [IGNORE] * len(prompt) + reply
            assert columns[f"{key}_attention_mask"] == [1] * (len(prompt) + len(reply))
            assert reply[-1] == prompt_format.eos and IGNORE not in reply

    batch = DPODataCollatorWithPadding(pad_token_id=prompt_format.eos)([orpo_row(row) for row, _ in case_rows])
    for i, (_, expected) in enumerate(case_rows):
        for key in ("chosen", "rejected"):
            labels = batch[f"{key}_labels"][i].tolist()
            assert [label for label in labels if label != IGNORE] == expected[f"{key}_ids"]


def test_dpo_completion_mask_is_the_answers(prompt_format, case_rows):
    """TRL's DPO collator, as dpo.py builds it, on the prepared rows: the completion mask is 1 exactly on each
    answer's ids, never on the prompt (the same ids for both answers) or the padding."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [row for row, _ in case_rows]
    batch = DataCollatorForPreference(pad_token_id=prompt_format.eos)(rows)
    width = batch["input_ids"].shape[1]
    for i, (row, expected) in enumerate(case_rows):
        prompt = expected["prompt_ids"]
        for half, key in ((0, "chosen_ids"), (len(rows), "rejected_ids")):
            reply = expected[key]
            ids, mask = batch["input_ids"][half + i].tolist(), batch["completion_mask"][half + i].tolist()
            assert ids[:len(prompt) + len(reply)] == prompt + reply
            assert mask == [0] * len(prompt) + [1] * len(reply) + [0] * (width - len(prompt) - len(reply))


# ---------------------------------------------------------------- dropped, cut and counted


def test_unusable_pairs_are_dropped_and_counted(prompt_format):
    """Equal answers (after stripping), an empty answer, a duplicate and a prompt longer than max_seq_length are
    dropped; an answer too long is cut to fit beside the whole prompt; unreadable rows count as invalid."""
    max_seq_length = 40
    records = [
        {"prompt": "q1", "chosen": "yes", "rejected": "no"},
        {"prompt": "q2", "chosen": "same ", "rejected": "\nsame"},
        {"prompt": "q3", "chosen": "  \n", "rejected": "no"},
        {"prompt": " q1", "chosen": "yes\n", "rejected": "no"},
        {"prompt": "word " * 100, "chosen": "yes", "rejected": "no"},
        {"prompt": "q6", "chosen": "long " * 100, "rejected": "short"},
        {"prompt": "q7", "chosen": "yes"},
        DataError("pairs.jsonl:8: malformed JSON: Expecting value (column 1)"),
    ]
    prepared = prepare(records, "auto", prompt_format, max_seq_length, skip_invalid=True)
    assert prepared.stats["dropped"] == {"equal answers": 1, "empty answer": 1, "duplicate": 1,
                                         "prompt longer than max_seq_length": 1, "invalid": 2}
    assert (prepared.stats["rows_in"], prepared.stats["kept"], prepared.stats["truncated"]) == (8, 2, 1)

    cut = next(row for row in prepared.train if len(row["chosen_ids"]) > 5)
    whole = encode_pair(to_pair(records[5], "auto", "pairs.jsonl:6"), prompt_format)
    room = max_seq_length - len(whole["prompt_ids"])
    assert cut == {"prompt_ids": whole["prompt_ids"], "chosen_ids": whole["chosen_ids"][:room],
                   "rejected_ids": whole["rejected_ids"]}  # the short answer is whole
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) == max_seq_length
    assert prepared.stats["chosen_tokens"]["max"] == room

    with pytest.raises(DataError, match=r"^pairs\.jsonl:7: a preference pair needs 'chosen' and 'rejected'"):
        prepare(records, "auto", prompt_format, max_seq_length)


def test_prompt_length_bounds_the_pair(prompt_format):
    """A prompt of exactly max_seq_length tokens leaves no room and is dropped; one token more of room keeps the
    pair, each answer cut to its first token."""
    record = {"prompt": "What is the capital of Arvenia?", "chosen": "Lumeport.", "rejected": "Brightwater."}
    whole = encode_pair(to_pair(record, "auto", "pairs.jsonl:1"), prompt_format)
    size = len(whole["prompt_ids"])
    with pytest.raises(DataError, match=r"pairs\.jsonl: no usable pairs left out of 1 .*prompt longer than"):
        prepare([record], "auto", prompt_format, size)
    prepared = prepare([record], "auto", prompt_format, size + 1)
    assert prepared.train == [{"prompt_ids": whole["prompt_ids"], "chosen_ids": whole["chosen_ids"][:1],
                               "rejected_ids": whole["rejected_ids"][:1]}]
    assert prepared.stats["truncated"] == 1


GOOD = {"prompt": "q", "chosen": "yes", "rejected": "no"}
GOOD_HH = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
GOOD_COLUMNS = {"question": "q", "good": "yes", "bad": "no"}
# (format, a good row of it, a bad row, what the error says after "pairs.jsonl:2: ")
BAD_ROWS = {
    "no rejected": ("auto", GOOD, {"prompt": "q", "chosen": "a"},
                    "a preference pair needs 'chosen' and 'rejected' fields (found ['chosen', 'prompt'])"),
    "no prompt": ("auto", GOOD, {"chosen": "a", "rejected": "b"}, "field 'prompt'"),
    "forced, no prompt": ("preference", GOOD, {"chosen": "a", "rejected": "b"}, "field 'prompt'"),
    "rejected not text": ("auto", GOOD, {"prompt": "q", "chosen": "a", "rejected": 3},
                          "field 'rejected' must be text, got int"),
    "no column": (COLUMNS, GOOD_COLUMNS, {"question": "q", "good": "a"},
                  "no column 'bad' (--rejected_field); the row has ['good', 'question']"),
    "answers' prompts differ": ("auto", GOOD, {"chosen": chat(None, [], "q") + answer("a"),
                                               "rejected": chat(None, [], "other q") + answer("b")},
                                "'chosen' and 'rejected' must share every turn before their last answer"),
    "two answers": ("auto", GOOD, {"prompt": chat(None, [], "q"), "chosen": answer("a") + answer("b"),
                                   "rejected": answer("c")}, "field 'chosen' must hold one assistant message"),
    "no hh turn": ("hh", GOOD_HH, {"chosen": "just text", "rejected": "\n\nHuman: q\n\nAssistant: no"},
                   "field 'chosen' has no '\\n\\nHuman:' turn"),
    "answer before question": ("auto", GOOD, {"prompt": answer("a"), "chosen": answer("b"), "rejected": answer("c")},
                               "turns must alternate user/assistant"),
}


@pytest.fixture(scope="module")
def v1_format(tiny_model):
    return load_prompt_format(tiny_model / "tokenizer.model")


@pytest.mark.parametrize("fmt, good, bad, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_stops_naming_file_line_and_field_or_is_counted(v1_format, fmt, good, bad, message):
    with pytest.raises(DataError) as err:
        prepare([good, bad], fmt, v1_format)
    assert str(err.value).startswith(f"pairs.jsonl:2: {message}"), str(err.value)
    prepared = prepare([good, bad], fmt, v1_format, skip_invalid=True)
    assert (prepared.stats["kept"], prepared.stats["dropped"]) == (1, {"invalid": 1})


def test_pair_columns_are_named_together():
    with pytest.raises(DataError, match="pass all three"):
        pair_format(Config(chosen_field="good", rejected_field="bad"))
    assert pair_format(Config(prompt_field="question", chosen_field="good", rejected_field="bad",
                              system_field="persona")) == COLUMNS
    assert pair_format(Config(dataset_format="hh")) == "hh"


# ---------------------------------------------------------------- which data holds pairs


def write_lines(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines), encoding="utf-8")
    return path


SFT_ROW = {"instruction": "q", "output": "a"}


def test_the_first_row_decides(tmp_path):
    """Pairs or instruction rows, by the first readable row; a forced format or named pair columns decide alone."""
    def first(lines):
        return first_record(str(write_lines(tmp_path / "d.jsonl", [json.dumps(x) + "\n" for x in lines])), "train")[0]

    pairs_first, sft_first = first([GOOD, SFT_ROW]), first([SFT_ROW, GOOD])
    assert holds_pairs(pairs_first, Config()) and not holds_pairs(sft_first, Config())
    assert holds_pairs(sft_first, Config(dataset_format="hh"))
    assert not holds_pairs(pairs_first, Config(dataset_format="alpaca"))
    assert holds_pairs(first([GOOD_COLUMNS]), Config(prompt_field="question", chosen_field="good",
                                                     rejected_field="bad"))
    assert not holds_pairs(None, Config())  # no readable row: instruction data, whose reader names the bad lines


def test_an_unparseable_first_line_does_not_decide(tmp_path, tiny_model):
    """A bad first line is skipped for detection but kept in the records, where --skip_invalid counts it."""
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "broken\n', json.dumps(GOOD) + "\n"])
    first, records = first_record(str(path), "train")
    assert first == (f"{path}:2", GOOD) and holds_pairs(first, Config())
    records = list(records)
    assert [location for location, _ in records] == [f"{path}:1", f"{path}:2"]
    assert isinstance(records[0][1], DataError)

    config = Config(dataset=str(path), model_name=str(tiny_model), eval_fraction=0.0)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: malformed JSON")):
        prepare_dataset(config, tmp_path / "out")
    config = Config(dataset=str(path), model_name=str(tiny_model), eval_fraction=0.0, skip_invalid=True)
    stats = prepare_dataset(config, tmp_path / "out")
    assert (stats["kind"], stats["kept"], stats["dropped"]) == ("preference", 1, {"invalid": 1})


def test_a_row_of_the_other_kind_is_named(tmp_path, tiny_model):
    """After a first pair an instruction row is a bad pair, and after a first instruction row a pair is a bad row."""
    for rows, message in (([GOOD, SFT_ROW], "a preference pair needs 'chosen' and 'rejected'"),
                          ([SFT_ROW, GOOD], "no usable fields")):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps(x) + "\n" for x in rows])
        with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
            prepare_dataset(Config(dataset=str(path), model_name=str(tiny_model)), tmp_path / "out")


def test_prepared_kind_of_a_folder_from_before_pairs(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"kept": 3}))
    assert prepared_kind(tmp_path) == "sft"


# ---------------------------------------------------------------- data_prep.py end to end


def report_value(stdout: str, key: str) -> str:
    """The value of one line of data_prep's report (`  key  value`)."""
    found = re.search(rf"^  {re.escape(key)}\s+(.*)$", stdout, re.M)
    assert found, f"no '{key}' line in:\n{stdout}"
    return found.group(1)


def test_data_prep_reports_pairs(tmp_path, tiny_model):
    """A pairs file whose first line is bad JSON (--skip_invalid): preference data, what was kept and dropped, the
    spread of prompt and answer lengths, written beside the ids."""
    pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
             for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (10, 20), (30, 40))]
    lines = ['{"prompt": "broken\n', *(json.dumps(p) + "\n" for p in pairs), json.dumps(pairs[0]) + "\n",
             json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n"]
    data, out = write_lines(tmp_path / "pairs.jsonl", lines), tmp_path / "data"
    result = run_script("data_prep.py", "--model_name", str(tiny_model), "--dataset", str(data), "--output_dir",
                        str(out), "--eval_fraction", "0.34", "--skip_invalid", timeout=300)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["kind"] == prepared_kind(out) == "preference"
    assert (stats["format"], stats["rows_in"], stats["kept"], stats["train_rows"], stats["eval_rows"]) == (
        "preference", 9, 6, 4, 2)
    assert stats["dropped"] == {"invalid": 1, "duplicate": 1, "equal answers": 1}
    data_set = load_prepared(out)
    assert set(data_set) == {"train", "eval"}
    assert data_set["train"].column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]

    report = result.stdout
    assert report_value(report, "pairs kept") == "6"
    assert report_value(report, "dropped") == "invalid: 1, duplicate: 1, equal answers: 1"
    assert report_value(report, "answers cut") == "0"
    assert report_value(report, "train / eval") == "4 / 2"
    for key in ("prompt", "chosen", "rejected"):
        spread = stats[f"{key}_tokens"]
        assert report_value(report, f"{key} tokens p50 / p90 / max") == (
            f"{spread['p50']} / {spread['p90']} / {spread['max']}")
        assert 0 < spread["p50"] <= spread["p90"] <= spread["max"]
    assert re.search(r"\[/INST\] «.+</s>»  \(chosen\)\n.*\[/INST\] «.+</s>»  \(rejected\)", report), report


def test_data_prep_reports_instruction_rows_as_sft(tmp_path, tiny_model, sample_data):
    out = tmp_path / "data"
    result = run_script("data_prep.py", "--model_name", str(tiny_model), "--dataset", str(sample_data),
                        "--output_dir", str(out), timeout=300)
    assert json.loads((out / "stats.json").read_text())["kind"] == prepared_kind(out) == "sft"
    assert "pairs kept" not in result.stdout and report_value(result.stdout, "trained token share")


def test_data_prep_names_a_bad_pair_in_one_line(tmp_path, tiny_model):
    data = write_lines(tmp_path / "pairs.jsonl", [json.dumps(GOOD) + "\n", json.dumps({"prompt": "q"}) + "\n"])
    result = run_script("data_prep.py", "--model_name", str(tiny_model), "--dataset", str(data), "--output_dir",
                        str(tmp_path / "data"), check=False, timeout=300)
    one_line_error(result, f"{data}:2: a preference pair needs 'chosen' and 'rejected' fields")
    assert not (tmp_path / "data").exists()
