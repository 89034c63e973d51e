"""The `jaxlm` command. Each subcommand parses its own arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlm.config import ConfigError

CONFIG_HELP = """\
CONFIG words, in order:
  PRESET | FILE.py       a preset name from configs/ (e.g. tiny, llama3_1b) or a Python file defining config()
  FILE.toml | FILE.json  stacked override files (a run's saved config.json works), applied in order
  section.field=value    overrides, parsed as Python literals and type-checked, e.g.
                         model.num_layers=4 optim.lr=3e-4 mesh.fsdp=-1 optim.no_decay='("norm","bias")'
"""


def _train(args) -> int:
    from jaxlm import overrides, train

    config = overrides.load(args.config)
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    summary = train.train(config)
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}; run the same command to resume")
    print(f"run directory: {summary['run_dir']}")
    print(f"  checkpoints: {summary['checkpoints']} (step {summary['step']})")
    print(f"  metrics: {summary['run_dir']}/metrics.jsonl, TensorBoard: {summary['run_dir']}/tensorboard")
    print(f"  config: {summary['run_dir']}/config.json, loss curve: {summary['run_dir']}/loss.png")
    if "loss" in summary:
        line = f"  final train loss {summary['loss']:.4f}"
        if "eval_loss" in summary:
            line += f", eval loss {summary['eval_loss']:.4f}"
        print(line)
    return 0


def _presets(args) -> int:
    from jaxlm import overrides

    print("\n".join(overrides.list_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train, finetune and run LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="pretrain a model", description="Pretrain a model. " + CONFIG_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["tiny"], help="preset, config files and overrides (default: tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for known failure kinds, tracebacks for bugs
        from jaxlm.train import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"jaxlm: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
