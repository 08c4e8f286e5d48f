"""Instruction data in any common format -> conversations -> Mistral token ids with responses-only labels.

Every reader yields (location, record) pairs where location is "file:line" (or "file:row N"), so each error names
where the bad input is. A line the reader cannot parse but can read past comes as a DataError in place of its record,
raised by `to_conversation`, so that --skip_invalid counts it like any other bad row. Nothing is written until the
whole data set has been read and checked.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .chat import IGNORE, Conversation, Message, PromptFormat, unencodable
from .hub import fetching

ACCEPTED = (
    "'text' in Llama-2 chat form (<s>[INST] ... [/INST] ... </s>), 'text' in Guanaco form (### Human: ... "
    "### Assistant: ...), Alpaca ('instruction', 'input', 'output'), Dolly ('instruction', 'context', 'response'), "
    "'question'/'answer', 'messages' (role/content), ShareGPT 'conversations' (from/value), or 'prompt'/'completion'; "
    "other columns: name them with --prompt_field and --response_field (--input_field, --system_field)"
)


class DataError(ValueError):
    """Bad input: the message starts with the file and line (or row) it is about."""


# ---------------------------------------------------------------- reading files


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: the byte-order mark Excel and Notepad put first is not content
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        location = f"{path}:{number}"
        try:
            record = json.loads(_decode(raw, path, number))
        except json.JSONDecodeError as err:
            record = DataError(f"{location}: malformed JSON: {err.msg} (column {err.colno})")
        except DataError as err:
            record = err
        yield location, record


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    """A JSON array of records, decoded one element at a time so that each record knows its line."""
    text = _decode(path.read_bytes(), path)
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")

    def fail(err_msg: str, pos: int):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: malformed JSON: {err_msg}")

    pos = whitespace.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        fail("expected a list of records", pos)
    pos = whitespace.match(text, pos + 1).end()
    while text[pos : pos + 1] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            fail(err.msg, err.pos)
        yield f"{path}:{text.count(chr(10), 0, pos) + 1}", record
        pos = whitespace.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos = whitespace.match(text, pos + 1).end()
        elif text[pos : pos + 1] != "]":
            fail("expected ',' or ']' after a record", pos)


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), path), newline=""))
    header = None
    while True:
        location = f"{path}:{reader.line_num + 1}"  # where the row starts: a quoted field may span lines
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{location}: malformed CSV: {err}") from None
        if not values:  # a blank line
            continue
        if header is None:
            header = values
        elif len(values) != len(header):
            yield location, DataError(f"{location}: {len(values)} fields where the header has {len(header)}")
        else:
            yield location, dict(zip(header, values))


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {number}", row


def _read_hub(name: str, split: str) -> Iterator[tuple[str, object]]:
    from datasets import load_dataset

    with fetching(name, "data set", "pass --dataset PATH to a local .jsonl, .json, .csv or .parquet file",
                  kind="dataset"):
        try:
            rows = load_dataset(name, split=split)
        except ValueError as err:  # datasets' word for a split or configuration the data set does not have
            raise DataError(f"{name}: {str(err).splitlines()[0]}") from None
    for number, row in enumerate(rows, start=1):
        yield f"{name}:row {number}", row


READERS: dict[str, Callable[[Path], Iterator[tuple[str, object]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_records(dataset: str, split: str = "train") -> Iterator[tuple[str, object]]:
    path = Path(dataset)
    suffix = path.suffix.lower()
    if suffix in READERS:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return READERS[suffix](path)
    if path.exists():
        raise DataError(f"{path}: not a data file (expected {', '.join(READERS)})")
    return _read_hub(dataset, split)


# ---------------------------------------------------------------- formats -> conversations

# An answer ends at </s>, <s>, the end, or an [INST] that opens a turn (is closed by [/INST] before any other [INST]):
# an [INST] in an answer's own text stays in the answer
_LLAMA2_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?:</s>|(?=<s>)|(?=\[INST\](?:(?!\[INST\]).)*?\[/INST\])|$)",
                          re.S)
_LLAMA2_SYS = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.S)
_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}


def text_field(record: dict, key: str, location: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{key}' must be text, got {type(value).__name__}")
    return value


def _from_llama2(record: dict, location: str) -> Conversation:
    text = text_field(record, "text", location)
    messages = []
    for user, answer in _LLAMA2_TURN.findall(text):
        system = _LLAMA2_SYS.search(user)
        if system:
            messages.append(Message("system", system.group(1)))
            user = _LLAMA2_SYS.sub("", user)
        messages += [Message("user", user), Message("assistant", answer)]
    if not messages:
        raise DataError(f"{location}: field 'text' has no [INST] ... [/INST] turn")
    return messages


def _from_guanaco(record: dict, location: str) -> Conversation:
    parts = _GUANACO_MARK.split(text_field(record, "text", location))
    pairs = list(zip(parts[1::2], parts[2::2]))
    if not pairs:
        raise DataError(f"{location}: field 'text' has no '### Human:' turn")
    return [Message("user" if who == "Human" else "assistant", said) for who, said in pairs]


@dataclass(frozen=True)
class Columns:
    """One exchange read from named columns: Alpaca's, Dolly's, question/answer, or those given by --prompt_field,
    --response_field, --input_field and --system_field (then `named`, and every named column must be in each row)."""

    prompt: str
    response: str
    inputs: tuple[str, ...] = ()  # text put after the prompt, from the first of these a row has (Alpaca's input)
    system: str | None = None
    named: bool = False

    def __str__(self) -> str:
        roles = {"prompt": self.prompt, "response": self.response, "input": ", ".join(self.inputs) or None,
                 "system": self.system}
        return "columns " + ", ".join(f"{role}={column}" for role, column in roles.items() if column)

    def _value(self, record: dict, column: str, role: str, location: str, optional: bool = False) -> str:
        if column not in record and (self.named or not optional):
            flag = f" (--{role}_field)" if self.named else ""
            raise DataError(f"{location}: no column '{column}'{flag}; the row has {sorted(record)}")
        value = record.get(column)
        if value is None and optional:  # an empty cell of a Parquet file or a hub data set
            return ""
        if not isinstance(value, str):
            raise DataError(f"{location}: field '{column}' must be text, got {type(value).__name__}")
        return value

    def __call__(self, record: dict, location: str) -> Conversation:
        user = self._value(record, self.prompt, "prompt", location)
        extra_column = next((c for c in self.inputs if c in record), self.inputs[0] if self.inputs else None)
        extra = self._value(record, extra_column, "input", location, optional=True) if extra_column else ""
        if extra.strip():
            user = f"{user.strip()}\n\n{extra.strip()}"
        system = self._value(record, self.system, "system", location, optional=True) if self.system else ""
        return ([Message("system", system)] if system.strip() else []) + [
            Message("user", user), Message("assistant", self._value(record, self.response, "response", location))]


def from_turns(record: dict, location: str, key: str, role_key: str, content_key: str) -> Conversation:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{location}: field '{key}' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{location}: field '{key}[{i}]'"
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise DataError(f"{where} must have a text '{content_key}'")
        role = _ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise DataError(f"{where}: unknown {role_key} {turn.get(role_key)!r} (use system, user or assistant)")
        messages.append(Message(role, turn[content_key]))
    return messages


def _from_prompt_completion(record: dict, location: str) -> Conversation:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
        return from_turns({"t": prompt + completion}, location, "t", "role", "content")
    return Columns("prompt", "completion")(record, location)


CONVERTERS: dict[str, Callable[[dict, str], Conversation]] = {
    "llama2": _from_llama2,
    "guanaco": _from_guanaco,
    "alpaca": Columns("instruction", "output", inputs=("input",)),
    "dolly": Columns("instruction", "response", inputs=("context", "input")),
    "question_answer": Columns("question", "answer"),
    "messages": lambda r, loc: from_turns(r, loc, "messages", "role", "content"),
    "sharegpt": lambda r, loc: from_turns(r, loc, "conversations", "from", "value"),
    "prompt_completion": _from_prompt_completion,
}


def detect_format(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        if "[INST]" in record["text"]:
            return "llama2"
        if _GUANACO_MARK.search(record["text"]):
            return "guanaco"
    for fmt, keys in (("alpaca", ("instruction", "output")), ("dolly", ("instruction", "response")),
                      ("question_answer", ("question", "answer")), ("messages", ("messages",)),
                      ("sharegpt", ("conversations",)), ("prompt_completion", ("prompt", "completion"))):
        if all(k in record for k in keys):
            return fmt
    return None


def normalize(messages: Conversation, location: str) -> Conversation:
    """Strip contents (so every format gives the same tokens), check the turn order, drop a trailing user turn."""
    messages = [Message(m.role, m.content.strip()) for m in messages]
    for m in messages:
        problem = unencodable(m.content)
        if problem:
            raise DataError(f"{location}: the {m.role} text's {problem}; fix the row (or pass --skip_invalid)")
    body = messages[1:] if messages and messages[0].role == "system" else messages
    for i, m in enumerate(body):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{location}: turns must alternate user/assistant after an optional system message")
    if body and body[-1].role == "user":
        messages = messages[:-1]  # a question with no answer teaches nothing
    return messages


def data_format(config) -> str | Columns:
    """The format rows are read in: the columns named by --prompt_field & co., else --dataset_format."""
    named = {role: getattr(config, f"{role}_field") for role in ("prompt", "response", "input", "system")}
    if not any(named.values()):
        return config.dataset_format
    if not (named["prompt"] and named["response"]):
        raise DataError("--prompt_field and --response_field name the columns together: pass both")
    if config.dataset_format != "auto":
        raise DataError(f"--dataset_format {config.dataset_format} and --prompt_field/--response_field exclude each "
                        f"other: pass one")
    return Columns(named["prompt"], named["response"], inputs=(named["input"],) if named["input"] else (),
                   system=named["system"], named=True)


def to_conversation(record: object, fmt: str | Columns, location: str) -> Conversation:
    """One record as a conversation, in format `fmt` ("auto": detected from the record's fields)."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected an object with fields, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise DataError(f"{location}: no usable fields (found {sorted(record)}); accepted formats: {ACCEPTED}")
    convert = fmt if isinstance(fmt, Columns) else CONVERTERS[fmt]
    return normalize(convert(record, location), location)


# ---------------------------------------------------------------- tokenizing, filtering, splitting


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    stats: dict


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def converted(records, convert, fmt, skip_invalid: bool, dropped: Counter):
    """(record, `convert(record, fmt, location)`) for each record read. A record it refuses stops the data (DataError,
    naming where), or with skip_invalid is counted in dropped["invalid"] and passed over."""
    for location, record in records:
        try:
            yield record, convert(record, fmt, location)
        except DataError:
            if not skip_invalid:
                raise
            dropped["invalid"] += 1


def shuffle_split(rows: list, eval_fraction: float, seed: int) -> int:
    """Shuffle `rows` in place with `seed`; returns how many of the first are held out for evaluation (at least one
    row is left to train on)."""
    random.Random(seed).shuffle(rows)
    return min(round(len(rows) * eval_fraction), len(rows) - 1)


def prepare_rows(records, fmt: str | Columns, prompt_format: PromptFormat, max_seq_length: int, train_on_prompt: bool,
                 eval_fraction: float, seed: int, skip_invalid: bool, source: str,
                 system_prompt: str | None = None) -> Prepared:
    """Convert, tokenize, filter and split. Returns rows of {input_ids, labels}."""
    rows, seen, dropped, detected = [], set(), Counter(), Counter()
    truncated = 0
    for record, conversation in converted(records, to_conversation, fmt, skip_invalid, dropped):
        detected[str(fmt) if fmt != "auto" else detect_format(record)] += 1
        if system_prompt and conversation and conversation[0].role != "system":
            conversation = [Message("system", system_prompt.strip()), *conversation]
        answers = [m.content for m in conversation if m.role == "assistant"]
        if not answers or not all(answers):  # an empty answer would teach the model to stop right after a question
            dropped["empty response"] += 1
            continue
        key = tuple((m.role, m.content) for m in conversation)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        ids, labels = prompt_format.encode(conversation)
        # judged on the answer labels even with train_on_prompt: a row cut before its first answer teaches no answer
        if all(label == IGNORE for label in labels[:max_seq_length]):
            dropped["prompt longer than max_seq_length"] += 1
            continue
        if train_on_prompt:
            labels = list(ids)
        if len(ids) > max_seq_length:
            truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        rows.append({"input_ids": ids, "labels": labels})
    rows_in = sum(detected.values()) + dropped["invalid"]
    if not rows:
        raise DataError(f"{source}: no usable rows left out of {rows_in} (dropped: {dict(dropped) or 'none'})")
    n_eval = shuffle_split(rows, eval_fraction, seed)
    lengths = [len(r["input_ids"]) for r in rows]
    trained = sum(sum(label != IGNORE for label in r["labels"]) for r in rows)
    stats = {
        **stats_head("sft", source, prompt_format, fmt, detected, rows_in, len(rows), dropped, truncated, n_eval),
        "tokens": sum(lengths),
        "trained_token_share": round(trained / max(1, sum(lengths)), 4),
        "length_p50": percentile(lengths, 0.5),
        "length_p90": percentile(lengths, 0.9),
        "length_max": max(lengths),
    }
    return Prepared(train=rows[n_eval:], eval=rows[:n_eval], stats=stats)


def stats_head(kind: str, source: str, prompt_format: PromptFormat, fmt, detected: Counter, rows_in: int, kept: int,
               dropped: Counter, truncated: int, n_eval: int) -> dict:
    """The part of stats.json that instruction rows and preference pairs (qlora/pairs.py) share: what was read, in
    which format (the most common one detected), what was kept, dropped, cut and held out."""
    return {"kind": kind, "source": source, "tokenizer": prompt_format.description,
            "format": str(fmt) if fmt != "auto" else (detected.most_common(1)[0][0] if detected else None),
            "rows_in": rows_in, "kept": kept, "dropped": dict(dropped), "truncated": truncated,
            "train_rows": kept - n_eval, "eval_rows": n_eval}


def show_example(row: dict, prompt_format: PromptFormat) -> str:
    """One row's text with the trained spans between « and », so the masking can be checked by eye."""
    out, span, trained_now = [], [], None
    for token, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE
        if trained != trained_now and span:
            text = prompt_format.text(span)
            out.append(f"«{text}»" if trained_now else text)
            span = []
        trained_now = trained
        span.append(token)
    if span:
        text = prompt_format.text(span)
        out.append(f"«{text}»" if trained_now else text)
    return " ".join(out)


# ---------------------------------------------------------------- the data_prep job

PREPARED_MARK = "stats.json"


def is_prepared(path: str | Path) -> bool:
    """A folder written by `prepare_dataset` (its stats.json is written last, so a finished one has it)."""
    return (Path(path) / PREPARED_MARK).is_file() and (Path(path) / "dataset_dict.json").is_file()


def print_stats(stats: dict) -> None:
    print_report([("source", stats["source"]), ("tokenizer", stats["tokenizer"]), ("format", stats["format"]),
                  ("rows in", stats["rows_in"]), ("kept", stats["kept"]), ("dropped", dropped_line(stats)),
                  ("truncated", stats["truncated"]), ("train / eval", f"{stats['train_rows']} / {stats['eval_rows']}"),
                  ("tokens p50 / p90 / max",
                   f"{stats['length_p50']} / {stats['length_p90']} / {stats['length_max']}"),
                  ("trained token share", stats["trained_token_share"])])


def dropped_line(stats: dict) -> str:
    return ", ".join(f"{why}: {n}" for why, n in stats["dropped"].items()) or "0"


def print_report(lines: list[tuple[str, object]]) -> None:
    """The data report: one (label, value) a line, the values aligned."""
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"  {label:<{width}}  {value}")


def prepared_kind(path: str | Path) -> str:
    """"preference" or "sft": what a data_prep output folder holds (folders from before pairs hold instruction rows)."""
    return json.loads((Path(path) / PREPARED_MARK).read_text(encoding="utf-8")).get("kind", "sft")


def load_prepared(path: str | Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except (OSError, ValueError) as err:  # pyarrow's word for a file cut short; a damaged .json
        raise DataError(f"{path}: damaged prepared data ({str(err).splitlines()[0]}); prepare it again with "
                        f"data_prep.py") from None
