"""The argparse pieces every command shares: the one-line-error parser, range-checked numeric flags, and the
help text for CONFIG words."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from jaxlm.core.config import Range, numeric_kind

CONFIG_HELP = """\
CONFIG words, in order:
  PRESET | FILE.py       a preset name from configs/ (e.g. tiny, llama3_1b) or a Python file defining config()
  FILE.toml | FILE.json  stacked override files (a run's saved config.json works), applied in order
  section.field=value    overrides, parsed as Python literals and type-checked, e.g.
                         model.num_layers=4 optim.lr=3e-4 mesh.fsdp=-1 optim.no_decay='("norm","bias")'
"""

QUANT_FORMATS = ("int8", "int4", "nf4")  # weight-only formats that generate, eval and quantize accept


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, `jaxlm generate: error: ...` and exit status 2, like a ConfigError in
    `main`: the usage block argparse prints first is left to --help. Subcommands inherit the class."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class Bounded:
    """An argparse `type=`: a number of `kind` within `valid` (the config schema's Range), else a one-line
    error naming the flag, the value and the range."""

    def __init__(self, kind: type, valid: Range):
        self.kind, self.valid = kind, valid

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if self.kind is int else 'a number'}: must be {self.valid}") from None
        if value not in self.valid:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {self.valid}")
        return value


def bounded(kind: type, **bounds) -> Bounded:
    """A flag's own range, e.g. bounded(float, gt=0, le=1)."""
    return Bounded(kind, Range(**bounds))


def like(schema: type, name: str) -> Bounded:
    """A flag that sets what config field `schema.name` sets takes the same values: one range for both."""
    field = next(f for f in dataclasses.fields(schema) if f.name == name)
    return Bounded(numeric_kind(typing.get_type_hints(schema)[name]), field.metadata["range"])


STEP = bounded(int, ge=0)  # a checkpoint step
COUNT = bounded(int, ge=1)  # documents, rows, sentences
