"""The rows a run trains on: a data_prep output folder as it is (its data settings become the run's), or the
configured data set prepared into output_dir/data by the same code as data_prep.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .chat import find_tokenizer_file, load_prompt_format
from .config import FIELDS, Config, ConfigError, given_by, saved_settings
from .data import PREPARED_MARK, is_prepared, load_prepared, prepared_kind
from .pairs import PAIR_METHODS
from .prepare import check_pair_settings, first_record, holds_pairs, prepare_dataset
from .device import is_main_process, wait_for_everyone
from .errors import RunError


def load_data(config: Config):
    """A data_prep output folder as is, or the configured data set prepared into output_dir/data by the same code
    (again when a run left one there that was prepared with other data settings)."""
    if is_prepared(config.dataset):
        return load_prepared(config.dataset)
    data_dir = Path(config.output_dir) / "data"
    stale = is_prepared(data_dir) and data_settings(prepared_with(data_dir)) != data_settings(config)
    if (stale or not is_prepared(data_dir)) and is_main_process():
        if stale:
            print(f"note: {data_dir} was prepared with other data settings; preparing it again")
        prepare_dataset(config, data_dir)
    wait_for_everyone()
    return load_prepared(data_dir)


def prepared_with(data_dir: Path) -> dict:
    """The settings a prepared folder was prepared with ({} where they cannot be read: it is then prepared again)."""
    try:
        return saved_settings(data_dir / "config.yaml") or {}
    except ConfigError:
        return {}


def data_settings(config: Config | dict) -> dict:
    """The settings that decide the prepared token ids: the data group and the base (its tokenizer)."""
    values = dataclasses.asdict(config) if isinstance(config, Config) else config
    return {name: values.get(name) for name, f in FIELDS.items() if f.metadata["group"] in ("data", "base")}


def as_prepared(config: Config) -> Config:
    """With a data_prep output folder as --dataset, the data settings it was prepared with are the run's, so that
    config.yaml records what the model is trained on. A data setting given otherwise (not left at its default) cannot
    apply to rows tokenized already: refused. Its `dataset` names the raw source and its `seed` only split it."""
    saved = Path(config.dataset) / "config.yaml"
    if not is_prepared(config.dataset) or not saved.is_file():
        return config
    try:
        prepared = saved_settings(saved)
    except ConfigError as err:
        raise RunError(f"{err}; prepare {config.dataset} again") from None
    fixed = [name for name, f in FIELDS.items()
             if f.metadata["group"] == "data" and name not in ("dataset", "seed") and name in (prepared or {})]
    given = [name for name in fixed if getattr(config, name) not in (prepared[name], FIELDS[name].default)]
    if given:
        presets = list(dict.fromkeys(given_by(config, n) for n in given if given_by(config, n) != f"--{n}"))
        again = " ".join(["data_prep.py"] + [f"--config {preset}" for preset in presets])
        raise RunError(f"{config.dataset} was prepared with " + ", ".join(f"{n}: {prepared[n]!r}" for n in given) +
                       f", which --dataset cannot change; {leave_out(config, given, presets)}; or prepare it again "
                       f"with {again} (or give its raw data as --dataset)")
    config = dataclasses.replace(config, **{name: prepared[name] for name in fixed})
    check_prepared_tokenizer(config)
    return config


def check_prepared_tokenizer(config: Config) -> None:
    """The prepared rows are token ids of the tokenizer named in stats.json: the model trained on them must have the
    same (family and vocabulary), or every id would stand for another word."""
    stats = json.loads((Path(config.dataset) / PREPARED_MARK).read_text(encoding="utf-8"))
    tokenizer = find_tokenizer_file(config.model_name, config.tokenizer_name)
    model_has = load_prompt_format(tokenizer, config.template).description
    if stats.get("tokenizer") not in (None, model_has):
        raise RunError(f"{config.dataset} was prepared with the {stats['tokenizer']} tokenizer, but {tokenizer} is "
                       f"{model_has}: its token ids would mean other words to {config.model_name}; prepare the data "
                       f"again with data_prep.py --model_name {config.model_name} (or give the raw data as --dataset)")


def leave_out(config: Config, names: list[str], presets: list[str]) -> str:
    """What to leave out, by where each value came from: `leave out --a` for a flag given, `configs/x.yaml sets b: 1:
    leave b out of it` for a preset's value."""
    flags = [f"--{n}" for n in names if given_by(config, n) == f"--{n}"]
    parts = [f"leave out {', '.join(flags)}"] if flags else []
    for preset in presets:
        mine = [n for n in names if given_by(config, n) == preset]
        parts.append(f"{preset} sets " + ", ".join(f"{n}: {getattr(config, n)!r}" for n in mine) +
                     f": leave {', '.join(mine)} out of it")
    return "; ".join(parts)



def check_method(config: Config) -> None:
    """Preference pairs train with --method dpo or orpo (not packed), instruction rows with sft: told from the
    prepared folder's stats or the raw data's first row, before anything is written."""
    data_dir = Path(config.output_dir) / "data"
    if is_prepared(config.dataset):
        pairs = prepared_kind(config.dataset) == "preference"
    elif is_prepared(data_dir) and data_settings(prepared_with(data_dir)) == data_settings(config):
        pairs = prepared_kind(data_dir) == "preference"  # a run's own data: its source need not be at hand to resume
    else:
        pairs = holds_pairs(first_record(config.dataset, config.dataset_split)[0], config)
    if pairs and config.method not in PAIR_METHODS:
        raise RunError(f"{config.dataset} holds preference pairs (a chosen and a rejected answer): train on them with "
                       f"--method dpo or --method orpo")
    if pairs:
        check_pair_settings(config)
    if pairs and config.packing:
        raise RunError("--packing is for instruction rows (--method sft): a preference pair's two sequences are "
                       "batched side by side; leave it out")
    if not pairs and config.method in PAIR_METHODS:
        raise RunError(f"{config.dataset} holds instruction rows, not preference pairs: --method {config.method} "
                       f"needs rows with a prompt, a chosen and a rejected answer (train on these with --method sft)")
