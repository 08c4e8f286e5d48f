"""Data formats and files -> the same token ids; bad input named by file and line; filtering, truncation, split."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_script
from qlora import fixtures
from qlora.chat import IGNORE, Message
from qlora.config import Config
from qlora.data import DataError, prepare_rows, read_records
from qlora.prepare import prepare_dataset


# (system, [(user, answer), ...]); the user text of the last one splits into Alpaca's instruction and input
CONVERSATIONS = [
    (None, [("What is the capital of Arvenia?", "The capital of Arvenia is Lumeport.")]),
    ("You answer in one sentence.", [("Name a colour.", "Violet is a colour.")]),
    (None, [("Add 2 and 3.", "2 plus 3 is 5."), ("And 4 more?", "That makes 9.")]),
    ("Be brief.", [("Hi", "Hello! How can I help?"), ("Count to three.", "1, 2, 3"), ("Thanks.", "You're welcome.")]),
    (None, [("List three primes.", "2, 3 and 5.")]),
    (None, [("Translate to French.\n\nGood morning, café.", "Bonjour, café — naïve 🌊\non two lines.")]),
]


def llama2(system, turns):
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    return {"text": "".join(f"<s>[INST] {sys_block if i == 0 else ''}{q} [/INST] {a} </s>"
                            for i, (q, a) in enumerate(turns))}


def guanaco(system, turns):
    return {"text": " ".join(f"### Human: {q} ### Assistant: {a}" for q, a in turns)}


def alpaca(system, turns):
    (q, a), = turns
    instruction, _, extra = q.partition("\n\n")
    return {"instruction": instruction, "input": extra, "output": a}


def messages(system, turns):
    head = [{"role": "system", "content": system}] if system else []
    chat = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]
    return {"messages": head + chat}


def sharegpt(system, turns):
    head = [{"from": "system", "value": system}] if system else []
    return {"conversations": head + [{"from": w, "value": v} for q, a in turns for w, v in (("human", q), ("gpt", a))]}


def dolly(system, turns):
    """databricks-dolly-15k's columns (its 'category' too, which is not read)."""
    (q, a), = turns
    instruction, _, extra = q.partition("\n\n")
    return {"instruction": instruction, "context": extra, "response": a, "category": "open_qa"}


def question_answer(system, turns):
    (q, a), = turns
    return {"question": q, "answer": a}


def prompt_completion(system, turns):
    (q, a), = turns
    return {"prompt": q, "completion": a}


def prompt_completion_turns(system, turns):
    """TRL's conversational prompt/completion: every turn but the last answer in the prompt."""
    chat = messages(system, turns)["messages"]
    return {"prompt": chat[:-1], "completion": chat[-1:]}


# format name -> (writer, carries a system message, carries several turns)
FORMATS = {
    "llama2": (llama2, True, True),
    "guanaco": (guanaco, False, True),
    "alpaca": (alpaca, False, False),
    "dolly": (dolly, False, False),
    "question_answer": (question_answer, False, False),
    "messages": (messages, True, True),
    "sharegpt": (sharegpt, True, True),
    "prompt_completion": (prompt_completion, False, False),
    "prompt_completion_turns": (prompt_completion_turns, True, True),
}
FLAT = ("llama2", "guanaco", "alpaca", "dolly", "question_answer", "prompt_completion")  # what CSV cells can hold


def carried(name):
    _, system, multi = FORMATS[name]
    return [(s, t) for s, t in CONVERSATIONS if (system or s is None) and (multi or len(t) == 1)]


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        fixtures.write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_format(directory: Path, name: str, suffix: str) -> Path:
    writer = FORMATS[name][0]
    return write(directory / f"{name}{suffix}", [writer(s, t) for s, t in carried(name)])


def conversation(system, turns):
    head = [Message("system", system)] if system else []
    return head + [Message(r, c) for q, a in turns for r, c in (("user", q), ("assistant", a))]


def expected_rows(prompt_format, name):
    return sorted((tuple(ids), tuple(labels))
                  for ids, labels in (prompt_format.encode(conversation(s, t)) for s, t in carried(name)))


def as_sorted(rows):
    return sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)


def prepare(path, prompt_format, fmt="auto", max_seq_length=512, train_on_prompt=False, eval_fraction=0.0, seed=0,
            skip_invalid=False, system_prompt=None):
    return prepare_rows(read_records(str(path)), fmt, prompt_format, max_seq_length, train_on_prompt, eval_fraction,
                        seed, skip_invalid, str(path), system_prompt)


# ---------------------------------------------------------------- every format and file type gives the same ids


COMBINATIONS = [(name, suffix) for name in FORMATS for suffix in (".jsonl", ".json", ".csv", ".parquet")
                if suffix != ".csv" or name in FLAT]


@pytest.mark.parametrize("name,suffix", COMBINATIONS, ids=[n + s for n, s in COMBINATIONS])
def test_every_format_and_file_type_gives_the_same_ids(tmp_path, prompt_format, name, suffix):
    prepared = prepare(write_format(tmp_path, name, suffix), prompt_format)
    assert as_sorted(prepared.train) == expected_rows(prompt_format, name)
    assert prepared.stats["format"] == name.removesuffix("_turns")
    assert prepared.stats["kept"] == prepared.stats["rows_in"] == len(carried(name))
    assert prepared.eval == []


def test_like_conversations_give_like_rows_across_formats(tmp_path, prompt_format):
    """The rows each format carries are the very rows 'messages' gives for the same conversations."""
    reference = {repr((s, t)): prompt_format.encode(conversation(s, t)) for s, t in CONVERSATIONS}
    by_messages = as_sorted(prepare(write_format(tmp_path, "messages", ".jsonl"), prompt_format).train)
    assert by_messages == sorted((tuple(i), tuple(la)) for i, la in reference.values())
    for name in FORMATS:
        rows = as_sorted(prepare(write_format(tmp_path, name, ".jsonl"), prompt_format).train)
        assert rows == sorted((tuple(i), tuple(la)) for i, la in (reference[repr(c)] for c in carried(name)))
        assert set(rows) <= set(by_messages)
    assert len(carried("alpaca")) == 3 and len(carried("guanaco")) == 4 and len(carried("llama2")) == 6
    assert len(carried("dolly")) == len(carried("question_answer")) == 3


# ---------------------------------------------------------------- data_prep.py end to end


def data_prep(*args):
    return run_script("data_prep.py", *map(str, args), check=False, timeout=120)


DATA_PREP_FILES = {"llama2": ".jsonl", "guanaco": ".csv", "alpaca": ".json", "dolly": ".jsonl",
                   "question_answer": ".parquet", "messages": ".parquet", "sharegpt": ".json",
                   "prompt_completion": ".csv"}


@pytest.mark.parametrize("name,suffix", DATA_PREP_FILES.items(), ids=[n + s for n, s in DATA_PREP_FILES.items()])
def test_data_prep_writes_the_dataset(tmp_path, tiny_model, prompt_format, name, suffix):
    from datasets import load_from_disk

    path, out = write_format(tmp_path, name, suffix), tmp_path / "out"
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, "--eval_fraction", 0.2)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    n = len(carried(name))
    assert stats["format"] == name and stats["rows_in"] == stats["kept"] == n and stats["dropped"] == {}
    assert stats["eval_rows"] == round(0.2 * n) and stats["train_rows"] == n - stats["eval_rows"]
    saved = load_from_disk(str(out))
    assert sorted(saved) == ["eval", "train"] and saved["train"].num_rows == stats["train_rows"]
    assert as_sorted([*saved["train"], *saved["eval"]]) == expected_rows(prompt_format, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "out"])  # nothing left beside it


def test_data_prep_reads_instruction_response_rows_with_no_format_flag(tmp_path, tiny_model, prompt_format):
    """Dolly's shape without its context column, the shape of many exports."""
    rows = [{"instruction": q, "response": a} for q, a in (("Name a colour.", "Violet."), ("Add 2 and 3.", "5."))]
    path, out = write(tmp_path / "d.jsonl", rows), tmp_path / "out"
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, "--eval_fraction", 0)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "stats.json").read_text())["format"] == "dolly"
    from datasets import load_from_disk

    want = sorted((tuple(i), tuple(la)) for i, la in (prompt_format.encode(conversation(None, [(r["instruction"],
                                                                                          r["response"])]))
                                                     for r in rows))
    assert as_sorted(load_from_disk(str(out))["train"]) == want


def named_columns(system, turns):
    """Columns no format has: read only when named (--prompt_field q --response_field a, and --input_field /
    --system_field for the optional ones)."""
    (q, a), = turns
    prompt, _, extra = q.partition("\n\n")
    return {"q": prompt, "a": a, "ctx": extra, "sys": system, "id": 7}


NAMED = ["--prompt_field", "q", "--response_field", "a", "--input_field", "ctx", "--system_field", "sys"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_prep_reads_columns_named_by_flags(tmp_path, tiny_model, prompt_format, suffix):
    chosen = [(s, t) for s, t in CONVERSATIONS if len(t) == 1]
    rows = [named_columns(s, t) for s, t in chosen]
    if suffix == ".csv":  # a CSV cell has no null: an empty system column means none
        rows = [{**r, "sys": r["sys"] or ""} for r in rows]
    path, out = write(tmp_path / f"d{suffix}", rows), tmp_path / "out"
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, "--eval_fraction", 0, *NAMED)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == "columns prompt=q, response=a, input=ctx, system=sys" and stats["kept"] == len(rows)
    from datasets import load_from_disk

    want = sorted((tuple(i), tuple(la)) for i, la in (prompt_format.encode(conversation(s, t)) for s, t in chosen))
    assert as_sorted(load_from_disk(str(out))["train"]) == want


def test_data_prep_reads_q_and_a_columns(tmp_path, tiny_model, prompt_format):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Name a colour.", "a": "Violet."}]
    path, out = write(tmp_path / "d.jsonl", rows), tmp_path / "out"
    refused = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out)
    assert refused.returncode != 0 and "--prompt_field" in refused.stderr.strip().splitlines()[-1]
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, "--eval_fraction", 0,
                       "--prompt_field", "q", "--response_field", "a")
    assert result.returncode == 0, result.stderr
    from datasets import load_from_disk

    want = sorted((tuple(i), tuple(la)) for i, la in (prompt_format.encode(conversation(None, [(r["q"], r["a"])]))
                                                     for r in rows))
    assert as_sorted(load_from_disk(str(out))["train"]) == want


@pytest.mark.parametrize("flags,missing", [(NAMED[:4], ("a", "--response_field")),
                                           (NAMED, ("ctx", "--input_field"))])
def test_a_missing_named_column_is_named_with_its_line(tmp_path, tiny_model, flags, missing):
    column, flag = missing
    good = {"q": "q1", "a": "a1", "ctx": "", "sys": ""}
    path, out = tmp_path / "d.jsonl", tmp_path / "out"
    write(path, [good, {k: v for k, v in {**good, "q": "q2"}.items() if k != column}, {**good, "q": "q3"}])
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, *flags)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {path}:2: no column '{column}' ({flag})"), message
    assert not out.exists()


@pytest.mark.parametrize("flags,expected", [(["--prompt_field", "q"], "pass both"),
                                            (["--prompt_field", "q", "--response_field", "a", "--dataset_format",
                                              "alpaca"], "exclude each other")])
def test_column_flags_that_do_not_go_together(tmp_path, tiny_model, flags, expected):
    path = write(tmp_path / "d.jsonl", [{"q": "q", "a": "a"}])
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", tmp_path / "out", *flags)
    assert result.returncode != 0 and expected in result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- bad input: named by file and line, nothing written

GOOD = json.dumps(messages(None, [("q", "a")]))
GOOD2 = json.dumps(llama2(None, [("q2", "a2")]))
BAD_INPUT = {
    # name: (file name, bytes, what the message must contain besides the file name)
    "malformed jsonl": ("d.jsonl", f'{GOOD}\n\n{{"text": "<s>[INST] q [/INST] a </s>"\n{GOOD2}\n'.encode(),
                        [":3: malformed JSON"]),
    "malformed json array": ("d.json", f'[\n  {GOOD},\n  {GOOD2},\n  {{"text": oops}}\n]\n'.encode(),
                             [":4: malformed JSON"]),
    "no usable fields": ("d.jsonl", f'{GOOD}\n{{"q": "q", "a": "a"}}\n'.encode(),
                         [":2: no usable fields", "['a', 'q']", "accepted formats", "'messages'", "'conversations'",
                          "Alpaca", "Dolly", "'question'/'answer'", "'prompt'/'completion'", "Guanaco", "Llama-2",
                          "--prompt_field and --response_field"]),
    "not utf-8": ("d.jsonl", GOOD.encode() + b"\n" + GOOD2.encode() + b'\n{"text": "caf\xe9"}\n',
                  [":3: bytes that are not UTF-8"]),
    "wrong field type": ("d.jsonl", (GOOD + '\n{"messages": [{"role": "user", "content": 5}]}\n').encode(),
                         [":2: field 'messages[0]' must have a text 'content'"]),
    "nothing left": ("d.jsonl", (json.dumps(messages(None, [("q", " ")])) + "\n" + GOOD.replace('"a"', '""')
                                 + "\n").encode(), ["no usable rows left out of 2", "empty response"]),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_stops_data_prep_and_writes_nothing(tmp_path, tiny_model, case):
    name, content, expected = case
    path, out = tmp_path / name, tmp_path / "out"
    path.write_bytes(content)
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {path}")
    for part in expected:
        assert part in message
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no output dir, no .tmp sibling


def test_skip_invalid_counts_bad_lines(tmp_path, tiny_model):
    lines = [GOOD, '{"text": broken', GOOD2, '{"question": "q"}', json.dumps(messages(None, [("q3", "")])), GOOD,
             json.dumps(sharegpt(None, [("q4", "a4")]))]
    path, out = tmp_path / "d.jsonl", tmp_path / "out"
    path.write_bytes("\n".join(lines).encode() + b'\n{"text": "\xff"}\n')
    result = data_prep("--dataset", path, "--model_name", tiny_model, "--output_dir", out, "--skip_invalid",
                       "--eval_fraction", 0)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == 8 and stats["kept"] == 3
    assert stats["dropped"] == {"invalid": 3, "empty response": 1, "duplicate": 1}


def test_reader_errors_name_the_line(tmp_path, prompt_format):
    """In-process checks of the readers' own errors, with and without --skip_invalid."""
    path = tmp_path / "d.csv"
    head = 'text,note\n"<s>[INST] q [/INST] line one\nline two </s>",n1\n'  # the quoted newline spans lines 2-3
    tail = '"### Human: q ### Assistant: a",n3\n'
    path.write_text(head + "plain text,n2\n" + tail, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:4: no usable fields \\(found \\['note', 'text'\\]\\)"):
        prepare(path, prompt_format)
    path.write_text(head + '"too","many","fields"\n' + tail, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:4: 3 fields where the header has 2"):
        prepare(path, prompt_format)
    assert prepare(path, prompt_format, skip_invalid=True).stats["dropped"] == {"invalid": 1}

    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Excel saves it
    assert prepare(bom, prompt_format, skip_invalid=True).stats["kept"] == 2

    with pytest.raises(DataError, match=f"^{tmp_path / 'nope.jsonl'}: no such file"):
        prepare(tmp_path / "nope.jsonl", prompt_format)
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match=f"^{broken}: not a readable Parquet file"):
        prepare(broken, prompt_format)


# ---------------------------------------------------------------- filtering, truncation, split


def test_empty_responses_and_duplicates_are_dropped_and_counted(tmp_path, prompt_format):
    records = [messages(None, [("q1", "a1")]),
               messages(None, [("q1", "  a1 ")]),  # the same once stripped
               messages(None, [("q2", "   ")]),
               messages(None, [("q3", "a3"), ("q4", "")]),  # an empty answer in any turn
               {"messages": [{"role": "user", "content": "unanswered"}]},
               messages(None, [("q5", "a5"), ("q6", "a6")]),
               {"messages": messages(None, [("q5", "a5"), ("q6", "a6")])["messages"] + [
                   {"role": "user", "content": "q7"}]}]  # a trailing question is dropped: then a duplicate
    prepared = prepare(write(tmp_path / "d.jsonl", records), prompt_format)
    assert prepared.stats["dropped"] == {"duplicate": 2, "empty response": 3}
    assert prepared.stats["kept"] == 2 and prepared.stats["rows_in"] == 7


def test_truncation_is_counted_and_prompt_too_long_dropped(tmp_path, prompt_format):
    long_answer = " ".join(["word"] * 50)
    rows = [messages(None, [("short question", long_answer)]),
            messages(None, [(" ".join(["long"] * 60) + " question", "a")]),
            messages(None, [("q", "a")])]
    path = write(tmp_path / "d.jsonl", rows)
    prompt_len = len(prompt_format.prompt_ids([Message("user", "short question")]))
    limit = prompt_len + 5
    for train_on_prompt in (False, True):
        prepared = prepare(path, prompt_format, max_seq_length=limit, train_on_prompt=train_on_prompt)
        assert prepared.stats["truncated"] == 1
        assert prepared.stats["dropped"] == {"prompt longer than max_seq_length": 1}
        assert prepared.stats["kept"] == 2
        cut = max(prepared.train, key=lambda r: len(r["input_ids"]))
        assert len(cut["input_ids"]) == len(cut["labels"]) == limit == prepared.stats["length_max"]
        trained = sum(label != IGNORE for label in cut["labels"])
        assert trained == (limit if train_on_prompt else 5)
        assert prompt_format.eos not in cut["input_ids"]


def test_split_is_deterministic_by_seed(sample_data, prompt_format):
    first = prepare(sample_data, prompt_format, eval_fraction=0.1, seed=1)
    again = prepare(sample_data, prompt_format, eval_fraction=0.1, seed=1)
    other = prepare(sample_data, prompt_format, eval_fraction=0.1, seed=2)
    assert (first.train, first.eval) == (again.train, again.eval)
    assert first.eval != other.eval and as_sorted(first.train + first.eval) == as_sorted(other.train + other.eval)
    kept = first.stats["kept"]
    assert len(first.eval) == first.stats["eval_rows"] == round(0.1 * kept)
    assert len(first.train) + len(first.eval) == kept
    assert not set(map(repr, first.eval)) & set(map(repr, first.train))


def test_split_always_leaves_training_rows(tmp_path, prompt_format):
    path = write(tmp_path / "d.jsonl", [messages(None, [("q1", "a1")]), messages(None, [("q2", "a2")])])
    prepared = prepare(path, prompt_format, eval_fraction=0.9)
    assert (len(prepared.train), len(prepared.eval)) == (1, 1)
    single = write(tmp_path / "one.jsonl", [messages(None, [("q", "a")])])
    assert len(prepare(single, prompt_format, eval_fraction=0.5).train) == 1


def test_system_prompt_flag_goes_where_a_system_message_would(tmp_path, prompt_format):
    path = write(tmp_path / "d.jsonl", [messages(None, [("q", "a")]), messages("Own.", [("q2", "a2")])])
    prepared = prepare(path, prompt_format, system_prompt=" Be kind. ")
    assert as_sorted(prepared.train) == sorted(
        (tuple(i), tuple(la)) for i, la in (prompt_format.encode(conversation("Be kind.", [("q", "a")])),
                                            prompt_format.encode(conversation("Own.", [("q2", "a2")]))))


def test_prepare_dataset_never_replaces_a_folder_it_did_not_write(tmp_path, tiny_model):
    data = write(tmp_path / "d.jsonl", [messages(None, [("q", "a")])])
    config = Config(dataset=str(data), model_name=str(tiny_model), eval_fraction=0.0)
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "adapter_model.safetensors").write_text("weights")
    with pytest.raises(DataError, match="is not a data_prep output"):
        prepare_dataset(config, precious)
    assert (precious / "adapter_model.safetensors").read_text() == "weights"

    out = tmp_path / "data"
    assert prepare_dataset(config, out)["kept"] == 1
    assert prepare_dataset(config, out)["kept"] == 1  # an earlier data_prep output is replaced
    with pytest.raises(DataError, match="--eval_fraction"):
        prepare_dataset(Config(dataset=str(data), model_name=str(tiny_model), eval_fraction=1.0), tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "data", "run"]
