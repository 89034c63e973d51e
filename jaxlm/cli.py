"""The `jaxlm` command. Each subcommand's parser and handler live together in a module of jaxlm.commands;
this module assembles them and turns known failures into one line and an exit status."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxlm.commands import (convert, data, evaluate, export, finetune, generate, peft, plan, presets, quantize, rl, serve,
                            tokenizer, train)
from jaxlm.commands.args import Parser
from jaxlm.core.config import ConfigError

# In the order `jaxlm --help` lists them.
COMMANDS = (train, generate, serve, evaluate, quantize, convert, export, finetune, rl, data, tokenizer, peft, plan, presets)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxlm", description="Train, finetune and run LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except BrokenPipeError:  # `jaxlm presets | head`: the reader has gone; no traceback, no flush error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as e:
        intact = getattr(e, "intact", None)  # checkpoint.DamagedCheckpoint, without importing Orbax for it
        hint = f"; pass --step {intact[-1]}" if intact and hasattr(args, "step") else ""  # the command takes --step
        print(f"jaxlm: error: {e}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for known failure kinds, tracebacks for bugs
        from jaxlm.training.loop import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"jaxlm: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
