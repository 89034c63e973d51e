"""`jaxlm finetune`: SFT, DPO or a reward model, full or LoRA/QLoRA."""

from __future__ import annotations

import argparse

from jaxlm.commands import summaries
from jaxlm.commands.args import CONFIG_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="SFT, DPO or a reward model, full or LoRA/QLoRA",
        description="Finetune a model: task=sft (default) on chat JSONL ({\"messages\": [...]} or\n"
                    "{\"prompt\", \"response\"}), loss on assistant tokens only; task=dpo on\n"
                    "{\"prompt\", \"chosen\", \"rejected\"} JSONL; or task=reward (model.num_labels=1, preset\n"
                    "reward_tiny) on the same pairs: a scalar head trained with the Bradley-Terry loss.\n"
                    "model.init_from: a jaxlm run directory, hf:DIR,\nRUN/adapters or a PEFT adapter directory (LoRA adapters to continue, on their base), BASE+ADAPTERS,\n"
                    "or empty for random weights. finetune.data: a JSONL file, chatterbot:english or\n"
                    "chatterbot:chinese. lora.targets (path regexes such as 'attn/(q|v)$') switch to LoRA,\n"
                    "lora.quantize=int8|nf4 to QLoRA.\n\nExample: jaxlm finetune sft_tiny model.init_from=runs/tiny\n\n"
                    + CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["sft_tiny"], help="preset, config files and overrides (default: sft_tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    return run_task(args, "sft")


def run_task(args, default: str, only: tuple[str, ...] = ()) -> int:
    """Loads the config (a pretraining one gets task=`default`), refuses a task not in `only` when given,
    then prints it (--print-config) or runs it: `jaxlm finetune` and `jaxlm rl`."""
    from jaxlm.core import overrides
    from jaxlm.core.config import ConfigError

    config = overrides.load(args.config)
    if config.task == "pretrain":
        import dataclasses

        config = dataclasses.replace(config, task=default)
    if only and config.task not in only:
        raise ConfigError(f"this command runs task={' or '.join(only)}, not task={config.task}; use jaxlm finetune for it")
    if args.print_config:
        import json

        print(json.dumps(overrides.to_dict(config), indent=2))
        return 0
    return run_config(config)


def run_config(config) -> int:
    """Finetunes (task=sft|dpo|reward) and reports: `jaxlm finetune`, and `jaxlm train` given a finetuning config."""
    from jaxlm.inference.generate import Generator
    from jaxlm.training import finetune as finetuner

    summaries.print_finetune(finetuner.finetune(config, sampler=Generator))
    return 0
