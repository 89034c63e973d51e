"""`jaxlm train`: pretrain a model (or finetune, when the config says task=sft|dpo)."""

from __future__ import annotations

import argparse

from jaxlm.commands import finetune, summaries
from jaxlm.commands.args import CONFIG_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model", description="Pretrain a model. " + CONFIG_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["tiny"], help="preset, config files and overrides (default: tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxlm.core import overrides

    config = overrides.load(args.config)  # before importing the trainer (and JAX): a bad config costs nothing
    if config.model.init_from:  # show the model shape the starting checkpoint sets
        from jaxlm.training import base

        config = base.resolve(config)
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    if config.task != "pretrain":  # task=sft / task=dpo in a config: the finetuning entry point
        return finetune.run_config(config)
    from jaxlm.evaluation import runner
    from jaxlm.training import pretrain as train

    summaries.print_pretrain(train.train(config, tasks=runner.in_training))
    return 0
