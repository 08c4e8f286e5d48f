"""Preference pairs in any common format -> a prompt and two answers -> Mistral token ids, for DPO and ORPO.

Each row becomes (prompt conversation, chosen answer, rejected answer), read by the same readers as instruction rows
(qlora/data.py), in one of the shapes:

    preference                {prompt, chosen, rejected} as texts, or TRL's conversational form: `prompt` a list of
                              messages, `chosen` and `rejected` lists holding the answer;
    preference_conversations  `chosen` and `rejected` whole conversations that share everything but the last answer
                              (UltraFeedback-binarized; a `prompt` column beside them is ignored);
    hh                        Anthropic HH's `chosen`/`rejected` texts of "\\n\\nHuman: ... \\n\\nAssistant: ..." turns;
    columns                   --prompt_field, --chosen_field and --rejected_field (and --system_field) by name.

The prompt is rendered once with Mistral's own ids (qlora/chat.py: the same renderer as SFT rows and inference), and
each answer is what the renderer appends after it: the answer's ids and EOS. Both answers share the prompt's ids
exactly; what DPO trains on and ORPO's odds ratio compares are the answers' tokens alone (ORPO's language-model term
also reads the prompt's: qlora/orpo.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .chat import Conversation, Message, PromptFormat, unencodable
from .data import (DataError, Prepared, converted, dropped_line, from_turns, normalize, percentile, print_report,
                   shuffle_split, stats_head, text_field)

PREFERENCE_FORMATS = ("preference", "preference_conversations", "hh")
PAIR_METHODS = ("dpo", "orpo")  # the training methods that read pairs
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Pair:
    prompt: Conversation  # ends with the user turn both answers reply to
    chosen: str
    rejected: str


def is_pair_record(record: object) -> bool:
    """Whether a row is a preference pair by its fields (a chosen and a rejected answer)."""
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def detect_pair_format(record: dict) -> str:
    chosen = record.get("chosen")
    if isinstance(chosen, list):
        whole = any(isinstance(m, dict) and m.get("role") == "user" for m in chosen)
        return "preference_conversations" if whole else "preference"
    if "prompt" in record or not (isinstance(chosen, str) and _HH_TURN.search(_hh_text(chosen))):
        return "preference"  # a row with no prompt and no HH turns is a pair missing its prompt: named so
    return "hh"


def _messages(value, location: str, key: str) -> Conversation:
    return from_turns({key: value}, location, key, "role", "content")


def _only_answer(messages: Conversation, location: str, key: str) -> str:
    if len(messages) != 1 or messages[0].role != "assistant":
        raise DataError(f"{location}: field '{key}' must hold one assistant message (the answer to 'prompt')")
    return messages[0].content


def _from_preference(record: dict, location: str) -> Pair:
    prompt = record.get("prompt")
    if isinstance(prompt, list):  # TRL's conversational form
        return Pair(_messages(prompt, location, "prompt"),
                    _only_answer(_messages(record.get("chosen"), location, "chosen"), location, "chosen"),
                    _only_answer(_messages(record.get("rejected"), location, "rejected"), location, "rejected"))
    return Pair([Message("user", text_field(record, "prompt", location))], text_field(record, "chosen", location),
                text_field(record, "rejected", location))


def _shared_prompt(chosen: Conversation, rejected: Conversation, location: str) -> Pair:
    """Two whole conversations that differ in their last answer only."""
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1].role != "assistant":
            raise DataError(f"{location}: field '{key}' must end with the assistant's answer")
    if [(m.role, m.content.strip()) for m in chosen[:-1]] != [(m.role, m.content.strip()) for m in rejected[:-1]]:
        raise DataError(f"{location}: 'chosen' and 'rejected' must share every turn before their last answer")
    return Pair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def _from_conversations(record: dict, location: str) -> Pair:
    return _shared_prompt(_messages(record.get("chosen"), location, "chosen"),
                          _messages(record.get("rejected"), location, "rejected"), location)


def _hh_text(text: str) -> str:
    return "\n\n" + text.lstrip("\n")  # a row may leave out the first turn's blank line


def _hh_turns(text: str, location: str, key: str) -> Conversation:
    parts = _HH_TURN.split(_hh_text(text))
    turns = [Message("user" if who == "Human" else "assistant", said) for who, said in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise DataError(f"{location}: field '{key}' has no '\\n\\nHuman:' turn")
    return turns


def _from_hh(record: dict, location: str) -> Pair:
    return _shared_prompt(_hh_turns(text_field(record, "chosen", location), location, "chosen"),
                          _hh_turns(text_field(record, "rejected", location), location, "rejected"), location)


@dataclass(frozen=True)
class PairColumns:
    """A pair read from columns named by --prompt_field, --chosen_field, --rejected_field (and --system_field)."""

    prompt: str
    chosen: str
    rejected: str
    system: str | None = None

    def __str__(self) -> str:
        return f"columns prompt={self.prompt}, chosen={self.chosen}, rejected={self.rejected}"

    def __call__(self, record: dict, location: str) -> Pair:
        for role in ("prompt", "chosen", "rejected"):
            if getattr(self, role) not in record:
                raise DataError(f"{location}: no column '{getattr(self, role)}' (--{role}_field); the row has "
                                f"{sorted(record)}")
        system = record.get(self.system) if self.system else None
        prompt = [Message("user", text_field(record, self.prompt, location))]
        if isinstance(system, str) and system.strip():
            prompt.insert(0, Message("system", system))
        return Pair(prompt, text_field(record, self.chosen, location), text_field(record, self.rejected, location))


CONVERTERS = {"preference": _from_preference, "preference_conversations": _from_conversations, "hh": _from_hh}


def pair_format(config) -> str | PairColumns:
    """The format pairs are read in: the columns named by --chosen_field & co., else --dataset_format."""
    if not (config.chosen_field or config.rejected_field):
        return config.dataset_format
    if not (config.prompt_field and config.chosen_field and config.rejected_field):
        raise DataError("--prompt_field, --chosen_field and --rejected_field name a pair's columns together: pass all "
                        "three")
    return PairColumns(config.prompt_field, config.chosen_field, config.rejected_field, config.system_field)


def to_pair(record: object, fmt: str | PairColumns, location: str) -> Pair:
    """One record as a pair, in format `fmt` ("auto": detected from the record's fields); contents stripped and the
    prompt's turns checked as for instruction rows."""
    if isinstance(record, DataError):
        raise record
    if not is_pair_record(record) and not isinstance(fmt, PairColumns):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{location}: a preference pair needs 'chosen' and 'rejected' fields (found {found}); or name "
                        f"the columns with --prompt_field, --chosen_field and --rejected_field")
    convert = fmt if isinstance(fmt, PairColumns) else CONVERTERS[detect_pair_format(record) if fmt == "auto" else fmt]
    pair = convert(record, location)
    chosen = normalize(pair.prompt + [Message("assistant", pair.chosen)], location)  # ends with the answer
    problem = unencodable(pair.rejected)
    if problem:
        raise DataError(f"{location}: the rejected answer's {problem}; fix the row (or pass --skip_invalid)")
    return Pair(chosen[:-1], chosen[-1].content, pair.rejected.strip())


def encode_pair(pair: Pair, prompt_format: PromptFormat) -> dict:
    """{prompt_ids, chosen_ids, rejected_ids}: the prompt's ids, then what the renderer puts after them for each
    answer (its ids and EOS), so that prompt + answer is exactly the SFT row of that conversation."""
    prompt_ids = prompt_format.prompt_ids(pair.prompt)
    row = {"prompt_ids": prompt_ids}
    for key, answer in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        ids, _ = prompt_format.encode(pair.prompt + [Message("assistant", answer)])
        assert ids[:len(prompt_ids)] == prompt_ids  # each segment is encoded alone: the prompt is a prefix
        row[key] = ids[len(prompt_ids):]
    return row


def prepare_pairs(records, fmt: str | PairColumns, prompt_format: PromptFormat, max_seq_length: int,
                  eval_fraction: float, seed: int, skip_invalid: bool, source: str,
                  system_prompt: str | None = None) -> Prepared:
    """Convert, tokenize, filter and split pairs. Returns rows of {prompt_ids, chosen_ids, rejected_ids}; answers of a
    pair longer than max_seq_length (prompt + answer) are cut, the prompt kept whole."""
    rows, seen, dropped, detected = [], set(), Counter(), Counter()
    truncated = 0
    for record, pair in converted(records, to_pair, fmt, skip_invalid, dropped):
        detected[str(fmt) if fmt != "auto" else detect_pair_format(record)] += 1
        if system_prompt and pair.prompt[0].role != "system":
            pair = Pair([Message("system", system_prompt.strip()), *pair.prompt], pair.chosen, pair.rejected)
        key = (tuple((m.role, m.content) for m in pair.prompt), pair.chosen, pair.rejected)
        reason = ("empty answer" if not (pair.chosen and pair.rejected) else
                  "equal answers" if pair.chosen == pair.rejected else "duplicate" if key in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        row = encode_pair(pair, prompt_format)
        room = max_seq_length - len(row["prompt_ids"])
        if room <= 0:
            dropped["prompt longer than max_seq_length"] += 1
            continue
        if max(len(row["chosen_ids"]), len(row["rejected_ids"])) > room:
            truncated += 1
            row["chosen_ids"], row["rejected_ids"] = row["chosen_ids"][:room], row["rejected_ids"][:room]
            if row["chosen_ids"] == row["rejected_ids"]:  # the answers differ only past the cut: nothing to prefer
                dropped["equal once cut"] += 1
                continue
        rows.append(row)
    rows_in = sum(detected.values()) + dropped["invalid"]
    if not rows:
        raise DataError(f"{source}: no usable pairs left out of {rows_in} (dropped: {dict(dropped) or 'none'})")
    n_eval = shuffle_split(rows, eval_fraction, seed)
    head = stats_head("preference", source, prompt_format, fmt, detected, rows_in, len(rows), dropped, truncated,
                      n_eval)
    return Prepared(train=rows[n_eval:], eval=rows[:n_eval], stats=head | {
        f"{part}_tokens": spread([len(r[f"{part}_ids"]) for r in rows]) for part in ("prompt", "chosen", "rejected")})


def spread(values: list[int]) -> dict:
    return {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9), "max": max(values)}


def print_pair_stats(stats: dict) -> None:
    def spread_of(part):
        values = stats[f"{part}_tokens"]
        return f"{values['p50']} / {values['p90']} / {values['max']}"

    print_report([("source", stats["source"]), ("tokenizer", stats["tokenizer"]), ("format", stats["format"]),
                  ("rows in", stats["rows_in"]), ("pairs kept", stats["kept"]), ("dropped", dropped_line(stats)),
                  ("answers cut", stats["truncated"]),
                  ("train / eval", f"{stats['train_rows']} / {stats['eval_rows']}")] +
                 [(f"{part} tokens p50 / p90 / max", spread_of(part)) for part in ("prompt", "chosen", "rejected")])


def show_pair(row: dict, prompt_format: PromptFormat) -> str:
    """A pair's text, each answer (the trained tokens) between « and »."""
    prompt = prompt_format.text(row["prompt_ids"])
    return (f"{prompt} «{prompt_format.text(row['chosen_ids'])}»  (chosen)\n"
            f"  {prompt} «{prompt_format.text(row['rejected_ids'])}»  (rejected)")
