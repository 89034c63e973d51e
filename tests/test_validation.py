"""Input validation as a class: every numeric config field and every numeric CLI flag declares its valid
range, and a value just outside it, or of the wrong type, is a one-line error naming the key or flag.

The fields and flags are found by introspection (the config dataclasses, the argparse tree), never listed by
hand, so a new field or flag without a declared range fails here. Nothing in this file compiles a model.
"""

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import types
import typing

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.commands import args as cli_args, data as data_command
from jaxlm.core import overrides
from jaxlm.core.config import Config, ConfigError, ModelConfig, PrepareConfig, SamplingConfig, validate
from jaxlm.inference.generate import Generator
from jaxlm.model import quantize
from jaxlm.planning import plan


def numeric(hint) -> type | None:
    """int or float for a number field, or a tuple of numbers; None for anything else (bool included)."""
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint if hint in (int, float) else None


def fields_of(schema: type, prefix: str):
    """(key, kind, range, is_tuple) for every numeric field of a config dataclass."""
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = numeric(hints[field.name])
        if kind is not None:
            yield (f"{prefix}{field.name}", kind, field.metadata.get("range"),
                   typing.get_origin(hints[field.name]) is tuple)


def config_fields():
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    return [f for name in sections for f in fields_of(hints[name], f"{name}.")]


def just_outside(valid, kind) -> list:
    """The nearest invalid value below and above the range (whichever sides are bounded)."""
    def move(x, direction):
        return x + direction if kind is int else math.nextafter(x, direction * math.inf)

    values = []
    for bound, closed, direction in ((valid.ge, True, -1), (valid.gt, False, -1), (valid.le, True, 1),
                                     (valid.lt, False, 1)):
        if bound is None:
            continue
        value = move(kind(bound), direction) if closed else kind(bound)
        while value in valid.special:  # e.g. mesh sizes: 0 is out, but -1 means "fill"
            value = move(value, direction)
        values.append(value)
    return values


CONFIG_FIELDS = config_fields()
PREPARE_FIELDS = list(fields_of(PrepareConfig, ""))
SAMPLING_FIELDS = list(fields_of(SamplingConfig, "sampling."))
ALL_FIELDS = CONFIG_FIELDS + PREPARE_FIELDS + SAMPLING_FIELDS


def out_of_range_cases(fields):
    # A field without a range has no cases here; the test of declared ranges names it.
    return [pytest.param(key, value, is_tuple, id=f"{key}={value!r}")
            for key, kind, valid, is_tuple in fields if valid for value in just_outside(valid, kind)]


def assert_one_line(message: str, key: str) -> None:
    assert "\n" not in message and message.strip() == message and message, message
    assert key in message, message


@pytest.mark.parametrize("key, kind, valid, is_tuple", [pytest.param(*f, id=f[0]) for f in ALL_FIELDS])
def test_every_numeric_field_declares_a_bounded_range(key, kind, valid, is_tuple):
    assert valid is not None, f"{key} has no declared range: use config.ranged(default, ge=/gt=/le=/lt=)"
    assert just_outside(valid, kind), f"{key}: a range with no bound rejects nothing"
    assert all(v not in valid for v in just_outside(valid, kind))


def test_defaults_and_presets_are_in_range():
    from jaxlm.data.prepare import run as prepare

    validate(Config())
    SamplingConfig()
    prepare.parse_config([])
    for preset in overrides.list_presets():
        overrides.load([preset])


@pytest.mark.parametrize("key, value, is_tuple", out_of_range_cases(CONFIG_FIELDS))
def test_config_value_just_outside_its_range_is_one_line_error(key, value, is_tuple):
    with pytest.raises(ConfigError) as e:
        overrides.load(["tiny", f"{key}={(value,) if is_tuple else value!r}"])
    assert_one_line(str(e.value), f"{key}=")
    assert "is out of range: " in str(e.value)


@pytest.mark.parametrize("key", [f[0] for f in CONFIG_FIELDS])
@pytest.mark.parametrize("text", ["abc", "'abc'", "True", "[[1]]"])
def test_config_value_of_the_wrong_type_is_one_line_error(key, text):
    with pytest.raises(ConfigError) as e:
        overrides.load(["tiny", f"{key}={text}"])
    assert_one_line(str(e.value), f"{key}=")


@pytest.mark.parametrize("text", ["1e999", "-1e999", "1" + "0" * 400])
def test_infinite_and_huge_floats_are_out_of_range(text):
    with pytest.raises(ConfigError, match=r"^optim\.lr=\S+ is out of range: "):
        overrides.load(["tiny", f"optim.lr={text}"])


def test_config_files_and_python_presets_are_range_checked(tmp_path):
    """A run's config.json (how a run is reproduced) and a preset's own values meet the same ranges."""
    saved = overrides.to_dict(overrides.load(["tiny"]))
    saved["optim"]["lr"] = -0.001
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"^optim\.lr=-0\.001 is out of range: must be > 0$"):
        overrides.load([str(tmp_path / "config.json")])
    (tmp_path / "bad.toml").write_text("[data]\nweights = [1.0, -2.0]\n")
    with pytest.raises(ConfigError, match=r"^data\.weights=\(1\.0, -2\.0\) is out of range: every item must be > 0$"):
        overrides.load(["tiny", str(tmp_path / "bad.toml")])
    for field, value in (("lora", "block_size=0"), ("model", "vocab_size='8192'")):
        (tmp_path / "mine.py").write_text(
            "import dataclasses\nfrom jaxlm.configs import tiny\n"
            f"def config():\n    c = tiny.config()\n"
            f"    return dataclasses.replace(c, {field}=dataclasses.replace(c.{field}, {value}))\n")
        with pytest.raises(ConfigError, match=f"^{field}\\.{value.split('=')[0]}="):
            overrides.load([str(tmp_path / "mine.py")])


@pytest.mark.parametrize("key", ["train.eval_every", "train.eval_batches", "train.eval_limit", "train.stop_at",
                                 "train.profile_start", "checkpoint.keep_every", "checkpoint.every_minutes",
                                 "distributed.watchdog_s"])
def test_zero_disables(key):
    """0 is declared: it disables the interval (train.eval_every=0: evaluate only at the final step)."""
    overrides.load(["tiny", f"{key}=0"])


@pytest.mark.parametrize("key", ["train.log_every", "checkpoint.every", "distributed.sync_every"])
def test_intervals_that_cannot_be_disabled_reject_zero(key):
    with pytest.raises(ConfigError, match=f"^{key}=0 is out of range: must be >= 1$"):
        overrides.load(["tiny", f"{key}=0"])


@pytest.mark.parametrize("key, value, is_tuple", out_of_range_cases(PREPARE_FIELDS))
def test_prepare_setting_out_of_range_is_one_line_error(key, value, is_tuple):
    from jaxlm.data.prepare import run as prepare

    with pytest.raises(ConfigError) as e:
        prepare.parse_config([f"{key}={value!r}"])
    assert_one_line(str(e.value), f"{key}=")
    with pytest.raises(ConfigError) as e:
        prepare.parse_config([f"{key}=abc"])
    assert_one_line(str(e.value), f"{key}=")


@pytest.mark.parametrize("key, value, is_tuple", out_of_range_cases(SAMPLING_FIELDS))
def test_sampling_settings_are_checked_where_generation_receives_them(key, value, is_tuple):
    name = key.removeprefix("sampling.")
    for bad in (value, "abc"):
        with pytest.raises(ValueError) as e:  # ConfigError is a ValueError, for library callers
            SamplingConfig(**{name: bad})
        assert isinstance(e.value, ConfigError)
        assert_one_line(str(e.value), f"{key}=")


def test_top_k_beyond_the_vocabulary_is_an_error():
    model = types.SimpleNamespace(config=ModelConfig(vocab_size=16))
    with pytest.raises(ConfigError, match="sampling.top_k=17 is out of range"):
        Generator(model, None, SamplingConfig(top_k=17))


def test_quantization_block_size_zero_is_an_error():
    for block_size in (0, -4):
        with pytest.raises(ConfigError, match=f"block_size={block_size} is out of range: must be >= 1"):
            quantize.quantize(np.ones((2, 8), np.float32), "int8", block_size)


@pytest.mark.parametrize("target", ["v5e-0", "v4-0", "h100x0", "v5e:0x8", "v5p:2x0x2", "v6e:8x0"])
def test_planner_targets_with_no_devices_are_one_line_errors(target):
    with pytest.raises(ConfigError) as e:
        plan.parse_target(target)
    assert_one_line(str(e.value), repr(target))
    assert "out of range" in str(e.value)
    with pytest.raises(ConfigError, match="--slices=0 is out of range"):
        plan.parse_target("v5e-8", slices=0)


# --- the command line --------------------------------------------------------------------------------

def parsers(parser: argparse.ArgumentParser, words: list[str]):
    """(words that reach the parser, the parser) for the command and all its subcommands."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, [*words, name])


def all_parsers():
    # `jaxlm data prepare` parses its own words with jaxlm.commands.data.prepare_parser.
    return [*parsers(cli.build_parser(), []), (["data", "prepare"], data_command.prepare_parser())]


def filler(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder positionals and required options, so that only the flag under test is wrong."""
    words = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.nargs == argparse.REMAINDER:
            continue
        if not action.option_strings:
            words.append("x")
        elif action.required:
            words += [action.option_strings[0], "x"]
    return words


def numeric_flags():
    cases = []
    for words, parser in all_parsers():
        for action in parser._actions:
            if isinstance(action.type, cli_args.Bounded):
                cases.append((words, filler(parser), action))
    return cases


NUMERIC_FLAGS = numeric_flags()


def test_every_numeric_flag_declares_a_range():
    plain = [f"jaxlm {' '.join(words)} {a.option_strings[0]}" for words, parser in all_parsers()
             for a in parser._actions if a.type in (int, float)]
    assert not plain, f"flags without a declared range (use bounded or like from jaxlm.commands.args): {plain}"
    assert len(NUMERIC_FLAGS) >= 20
    for words, _, action in NUMERIC_FLAGS:
        assert action.default is None or action.default in action.type.valid, (words, action.option_strings)


@pytest.mark.parametrize("words, fill, action, value", [
    pytest.param(words, fill, action, value, id=f"{' '.join(words)} {action.option_strings[0]}={value}")
    for words, fill, action in NUMERIC_FLAGS
    for value in [*just_outside(action.type.valid, action.type.kind), "abc"]
])
def test_numeric_flag_out_of_range_or_wrong_type_is_one_line_exit_2(capsys, words, fill, action, value):
    flag = action.option_strings[-1]
    with pytest.raises(SystemExit) as e:
        cli.main([*words, *fill, f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"jaxlm {' '.join(words)}: error: argument ") and flag in lines[0], err
    assert "must be" in lines[0], err


def test_config_errors_from_main_are_one_line_exit_2(capsys):
    for argv, message in ((["train", "tiny", "optim.lr=-0.001"], "optim.lr=-0.001 is out of range: must be > 0"),
                          (["data", "prepare", "x", "--out", "x", "minhash_bands=0"],
                           "minhash_bands=0 is out of range: must be >= 1")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"jaxlm: error: {message}"], err


def test_help_still_works(capsys):
    for words, _ in all_parsers():
        try:
            code = cli.main([*words, "--help"])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr().out
        assert code == 0 and "usage" in out.lower(), words


@pytest.mark.parametrize("argv, line", [
    (["train", "tiny", "optim.lr=-0.001"], "jaxlm: error: optim.lr=-0.001 is out of range: must be > 0"),
    (["generate", "runs/none", "--temperature", "-1"],
     "jaxlm generate: error: argument --temperature: -1 is out of range: must be >= 0"),
    (["plan", "tiny", "--target", "v5e-0"],
     "jaxlm: error: target 'v5e-0': 0 chips is out of range: must be >= 1, e.g. v5e-8"),
])
def test_end_to_end_exit_2_with_one_stderr_line(argv, line):
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.strip()] == [line], proc.stderr
