"""The data_prep job: read the data set, tell preference pairs from instruction rows by the first readable row (or
the format asked for), prepare them (qlora/pairs.py or qlora/data.py) and write the DatasetDict with stats.json and
config.yaml, whole or not at all."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from . import pairs
from .chat import load_prompt_format
from .data import (PREPARED_MARK, DataError, data_format, is_prepared, prepare_rows, print_stats, read_records,
                   show_example)


def prepare_dataset(config, out_dir: str | Path) -> dict:
    """Read, convert, tokenize and split `config.dataset`; write a DatasetDict, stats.json and config.yaml."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    from . import atomic
    from .chat import find_tokenizer_file
    from .config import to_yaml
    from .errors import writing

    if not 0 <= config.eval_fraction < 1:
        raise DataError(f"--eval_fraction must be at least 0 and below 1, got {config.eval_fraction}")
    out = Path(out_dir)
    # the finished folder replaces out_dir whole, so only an earlier data_prep output (or nothing) may be there
    if out.exists() and not is_prepared(out) and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a data_prep output; choose another --output_dir or remove it")
    atomic.check_writable(out.parent)
    first, records = first_record(config.dataset, config.dataset_split)  # a missing file is named before the model
    preference = holds_pairs(first, config)
    fmt = pairs.pair_format(config) if preference else data_format(config)
    prompt_format = load_prompt_format(find_tokenizer_file(config.model_name, config.tokenizer_name), config.template)
    if preference:
        check_pair_settings(config)
        prepared = pairs.prepare_pairs(records, fmt, prompt_format, config.max_seq_length, config.eval_fraction,
                                       config.seed, config.skip_invalid, config.dataset, config.system_prompt)
    else:
        prepared = prepare_rows(records, fmt, prompt_format,
                                config.max_seq_length, config.train_on_prompt, config.eval_fraction, config.seed,
                                config.skip_invalid, config.dataset, config.system_prompt)
    disable_progress_bars()
    with writing(out_dir), atomic.atomic_dir(out_dir) as tmp:  # datasets' writers may name no file
        splits = {"train": Dataset.from_list(prepared.train)}
        if prepared.eval:
            splits["eval"] = Dataset.from_list(prepared.eval)
        DatasetDict(splits).save_to_disk(str(tmp))
        (tmp / "config.yaml").write_text(to_yaml(config))
        (tmp / PREPARED_MARK).write_text(json.dumps(prepared.stats, indent=2))
    print(f"data: {config.dataset} -> {out_dir}")
    (pairs.print_pair_stats if preference else print_stats)(prepared.stats)
    print("example (trained tokens between « »):")
    print("  " + (pairs.show_pair if preference else show_example)(prepared.train[0], prompt_format))
    return prepared.stats


def first_record(dataset: str, split: str):
    """(the first record or None, all records from the first): what the data holds is told by its first row."""
    records, read = read_records(dataset, split), []
    for location, record in records:  # lines that could not be parsed (--skip_invalid drops them) tell nothing
        read.append((location, record))
        if not isinstance(record, DataError):
            return (location, record), itertools.chain(read, records)
    return None, iter(read)


def holds_pairs(first, config) -> bool:
    """Whether the data is preference pairs, by the format asked for or the first row's fields."""
    if config.dataset_format != "auto" or config.chosen_field or config.rejected_field:
        return config.dataset_format in pairs.PREFERENCE_FORMATS or bool(config.chosen_field or config.rejected_field)
    return pairs.is_pair_record(first[1]) if first else False


def check_pair_settings(config) -> None:
    """Settings of instruction rows that preference pairs cannot take, refused rather than ignored."""
    if config.train_on_prompt:
        raise DataError(f"{config.dataset} holds preference pairs, whose answers DPO and ORPO compare: "
                        f"--train_on_prompt is for instruction rows; leave it out")
