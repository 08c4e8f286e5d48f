"""The typed config: reference-recipe defaults, YAML presets under flags, errors that name the key and the file."""

from pathlib import Path

import pytest

from conftest import ROOT
from qlora.config import DATA_PREP, INFER, LORA_TARGETS, SCRIPTS, Config, ConfigError, load_yaml, parse, to_yaml


def offering(argv: list[str]) -> str:
    """A script whose flags include every flag in `argv` (the cases here are about the flags, not whose they are)."""
    flags = {arg[2:] for arg in argv if arg.startswith("--")} - {"config"}
    return next(script for script, names in SCRIPTS.items() if flags <= set(names))


def run(*argv, script=None):
    argv = list(map(str, argv))
    return parse(script or offering(argv), "test", argv)[0]


def failure(capsys, *argv, script=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, script=script)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def preset(tmp_path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_reference_preset_is_the_reference_recipe():
    c = run("--config", "configs/reference.yaml")
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (8, 32, 0.1)
    assert c.lora_target_modules == LORA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]
    assert (c.max_seq_length, c.per_device_train_batch_size, c.gradient_accumulation_steps) == (512, 1, 8)
    assert c.token_budget is None
    assert (c.learning_rate, c.num_train_epochs, c.logging_steps, c.save_steps) == (2e-4, 3, 10, 100)
    assert c.model_name == "unsloth/mistral-7b-instruct-v0.2-bnb-4bit"
    assert c.dataset == "mlabonne/guanaco-llama2-1k"
    assert (c.packing, c.train_on_prompt, c.load_in_4bit) == (False, False, True)


def test_defaults_are_the_fast_recipe():
    """The reference recipe's model, data, LoRA rank and schedule; token-budget batches and checkpointing planned from
    the free memory, and dropout 0, instead (README: "The default recipe")."""
    c = run()
    assert c == Config()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules) == (8, 32, 0.0, LORA_TARGETS)
    assert (c.token_budget, c.tokens_per_step, c.gradient_accumulation_steps, c.max_seq_length) == ("auto", 12288, 1, 2048)
    assert (c.gradient_checkpointing, c.checkpoint_skip_layers, c.optim) == ("auto", "auto", "auto")
    assert (c.learning_rate, c.num_train_epochs, c.logging_steps, c.save_steps) == (2e-4, 3, 10, 100)
    assert (c.model_name, c.dataset) == ("unsloth/mistral-7b-instruct-v0.2-bnb-4bit", "mlabonne/guanaco-llama2-1k")


def test_list_defaults_are_not_shared():
    first = Config()
    first.lora_target_modules.append("lm_head")
    assert Config().lora_target_modules == LORA_TARGETS and "lm_head" not in LORA_TARGETS


def test_flags_win_over_the_yaml_file(tmp_path):
    path = preset(tmp_path, "lora_r: 4\nlearning_rate: 2.0e-5\nmax_seq_length: 1024\npacking: true\n"
                            "lora_target_modules: [q_proj, v_proj]\neval_steps: null\n")
    c = run("--config", path, "--lora_r", "16", "--packing", "false")
    assert (c.lora_r, c.packing) == (16, False)  # flags
    assert (c.learning_rate, c.max_seq_length, c.lora_target_modules) == (2e-5, 1024, ["q_proj", "v_proj"])  # file
    assert (c.lora_alpha, c.eval_steps) == (32, None)  # neither


def test_yaml_numbers_in_exponent_form_are_floats(tmp_path):
    """YAML 1.1 reads `2e-4` (no dot) as a string; it is still a learning rate."""
    assert run("--config", preset(tmp_path, "learning_rate: 2e-4\nnum_train_epochs: 1\n")).learning_rate == 2e-4
    assert isinstance(run("--config", preset(tmp_path, "num_train_epochs: 1\n")).num_train_epochs, float)


def test_the_smoke_preset_loads():
    c = run("--config", ROOT / "configs" / "smoke.yaml")
    assert (c.backend, c.model_name, c.lora_dropout, c.load_in_4bit) == ("cpu", "fixtures/tiny-mistral", 0.0, False)


@pytest.mark.parametrize("text,key", [("lora_rank: 8\n", "lora_rank"), ("lora_r: eight\n", "lora_r"),
                                      ("lora_r: 8.5\n", "lora_r"), ("packing: maybe\n", "packing"),
                                      ("learning_rate: fast\n", "learning_rate"), ("lora_r: null\n", "lora_r"),
                                      ("lora_target_modules: [1, 2]\n", "lora_target_modules"),
                                      ("dataset: [a, b]\n", "dataset")])
def test_bad_yaml_keys_are_errors_naming_key_and_file(tmp_path, capsys, text, key):
    path = preset(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{path}: .*'{key}'"):
        load_yaml(path)
    message = failure(capsys, "--config", path)
    assert str(path) in message and f"'{key}'" in message


def test_unusable_yaml_files_are_errors_naming_the_file(tmp_path, capsys):
    for text, why in (("lora_r: [\n", "not valid YAML"), ("- a\n- b\n", "expected a mapping")):
        path = preset(tmp_path, text)
        assert f"{path}: {why}" in failure(capsys, "--config", path)
    assert f"{tmp_path / 'missing.yaml'}: no such config file" in failure(capsys, "--config", tmp_path / "missing.yaml")


def test_empty_yaml_file_means_defaults(tmp_path):
    assert run("--config", preset(tmp_path, "# nothing yet\n")) == Config()


@pytest.mark.parametrize("argv,key", [(["--lora_r", "eight"], "lora_r"), (["--learning_rate", "fast"], "learning_rate"),
                                      (["--packing", "maybe"], "packing"),
                                      (["--checkpoint_skip_layers", "some"], "checkpoint_skip_layers")])
def test_bad_flag_values_are_errors_naming_the_flag(capsys, argv, key):
    assert f"--{key}: '{key}' must be" in failure(capsys, *argv)


def test_numbers_that_also_take_auto(tmp_path):
    assert (run("--checkpoint_skip_layers", "6").checkpoint_skip_layers, run().checkpoint_skip_layers) == (6, "auto")
    in_yaml = preset(tmp_path, "checkpoint_skip_layers: 4\ntoken_budget: 8192\n")
    assert (run("--config", in_yaml).checkpoint_skip_layers, run("--config", in_yaml).token_budget) == (4, 8192)
    for resolved in (Config(checkpoint_skip_layers=8, token_budget=12288), Config()):  # config.yaml, as --resume reads it
        saved = preset(tmp_path, to_yaml(resolved))
        assert (run("--config", saved).checkpoint_skip_layers, run("--config", saved).token_budget) == \
            (resolved.checkpoint_skip_layers, resolved.token_budget)


@pytest.mark.parametrize("argv,expected", [([], False), (["--packing"], True), (["--packing", "true"], True),
                                           (["--packing", "false"], False), (["--packing", "False"], False),
                                           (["--packing", "yes"], True), (["--packing", "0"], False)])
def test_boolean_flags(argv, expected):
    assert run(*argv).packing is expected


def test_boolean_flag_alone_overrides_yaml_false(tmp_path):
    assert run("--config", preset(tmp_path, "packing: false\n"), "--packing").packing is True


@pytest.mark.parametrize("argv", [["q_proj", "v_proj"], ["q_proj,v_proj"], ["q_proj,", "v_proj"], ["q_proj, v_proj"]])
def test_list_flags(argv):
    assert run("--lora_target_modules", *argv).lora_target_modules == ["q_proj", "v_proj"]


def test_list_in_yaml_as_a_string(tmp_path):
    assert run("--config", preset(tmp_path, "gguf_types: f16, q4_k_m\n")).gguf_types == ["f16", "q4_k_m"]


def test_scripts_see_only_their_flags(tmp_path, capsys):
    """A flag the script does not read is refused; a shared YAML preset may still set any known key."""
    assert "unrecognized arguments: --lora_r" in failure(capsys, "--lora_r", "4", script=DATA_PREP)
    c = run("--config", preset(tmp_path, "lora_r: 4\ndataset: d.jsonl\n"), "--seed", "7", script=DATA_PREP)
    assert (c.lora_r, c.dataset, c.seed) == (4, "d.jsonl", 7)


def test_extra_arguments_stay_apart():
    config, extras = parse(INFER, "test", ["prompt.txt", "--max_new_tokens", "12"],
                           extra=lambda p: p.add_argument("prompt_file"))
    assert (config.max_new_tokens, extras.prompt_file) == (12, "prompt.txt")
    assert not hasattr(config, "prompt_file")


def test_every_number_and_name_field_has_a_check():
    """The table beside the fields: a new numeric field without a `check` fails here, not on a user's input."""
    import typing

    from qlora.config import FIELDS, _base_type

    hints = typing.get_type_hints(Config)
    numeric = [name for name in FIELDS if _base_type(hints[name])[0] in (int, float)]
    assert len(numeric) > 25
    assert [name for name in numeric + ["optim", "lr_scheduler_type"] if FIELDS[name].metadata["check"] is None] == []


@pytest.mark.parametrize("flag,bad,good", [
    ("--num_train_epochs", "0", "0.5"), ("--learning_rate", "-0.001", "1e-5"), ("--learning_rate", "nan", "0.1"),
    ("--lora_r", "0", "1"), ("--lora_alpha", "0", "1"), ("--lora_dropout", "1", "0.1"), ("--eval_fraction", "1", "0"),
    ("--max_seq_length", "0", "1"), ("--seed", "-1", "0"), ("--max_steps", "0", "-1"), ("--token_budget", "0", "auto"),
    ("--gradient_accumulation_steps", "0", "1"), ("--save_steps", "0", "1"), ("--eval_steps", "0", "none"),
    ("--warmup_steps", "-1", "0"), ("--top_p", "0", "1"), ("--temperature", "-0.1", "0"),
    ("--optim", "adam", "adamw_8bit"), ("--lr_scheduler_type", "cosin", "cosine"),
])
def test_checks_refuse_what_makes_no_sense_in_one_line(capsys, tmp_path, flag, bad, good):
    name = flag[2:]
    assert f"error: --{name}: '{name}' must be " in failure(capsys, flag, bad)
    in_yaml = preset(tmp_path, f"{name}: {bad}\n")
    assert f"error: {in_yaml}: '{name}' must be " in failure(capsys, "--config", in_yaml)
    run(flag, good)


def test_a_config_that_is_a_folder_or_binary_is_one_line(tmp_path, capsys):
    assert f"{tmp_path}: is a folder; --config takes a YAML file" in failure(capsys, "--config", tmp_path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x00\x01")
    assert f"{binary}: not a YAML file (bytes that are not UTF-8 at byte 0)" in failure(capsys, "--config", binary)
