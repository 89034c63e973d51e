"""`jaxlm rl`: learning from rewards (GRPO, PPO) on the finetuning path."""

from __future__ import annotations

import argparse

from jaxlm.commands.args import CONFIG_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rl", help="GRPO or PPO: sample completions, reward them, learn from the rewards",
        description="Learn from rewards with GRPO (task=grpo): each rollout samples rl.group_size completions\n"
                    "for train.batch_size / rl.group_size prompts of rl.prompts (JSONL {\"prompt\": text or\n"
                    "messages, ...}) from the policy being trained, scores them with the rl.reward functions\n"
                    "(MODULE:FUNCTION, called as fn(prompt=row, completion=text) -> number), normalises the\n"
                    "rewards within each group, and takes rl.iterations clipped-ratio steps with a KL penalty\n"
                    "(rl.beta) to the starting model. rl.loss=grpo|dr_grpo|dapo, rl.epsilon_high (DAPO's clip),\n"
                    "rl.drop_zero_variance. model.init_from and lora.* as for jaxlm finetune; the same checkpoints,\n"
                    "preemption and exact resume.\n\nPPO (task=ppo, preset ppo_tiny) as in RLHF: a value head on the policy's\n"
                    "backbone (model.value_head), per-token rewards of -rl.beta x the log-ratio to the reference plus\n"
                    "the score at the last token, GAE (rl.gamma, rl.lam), and the value loss clipped to rl.value_clip\n"
                    "weighted by rl.vf_coef.\n\nExample: jaxlm rl grpo_tiny model.init_from=runs/sft_tiny "
                    "rl.prompts=prompts.jsonl rl.reward='(\"my_rewards:exact\",)'\n\n" + CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", default=["grpo_tiny"], help="preset, config files and overrides (default: grpo_tiny)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxlm.commands.finetune import run_task
    from jaxlm.core.config import RL_TASKS

    return run_task(args, "grpo", only=RL_TASKS)
