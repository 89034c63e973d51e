"""GRPO with LoRA on the `tiny` backbone: 4 completions per prompt, 2 prompts per rollout, one update per
rollout, on the built-in task (continue a KJV verse, rewarded by unigram F1). Set model.init_from (the run
to improve); rl.prompts and rl.reward for your own task."""

import dataclasses

from jaxlm.configs import sft_tiny
from jaxlm.core.config import RLConfig


def config():
    base = sft_tiny.config()
    return dataclasses.replace(
        base, name="grpo_tiny", task="grpo",
        rl=RLConfig(prompts="kjv:verses", reward=("jaxlm.data.verses:continuation_f1",), group_size=4,
                    max_new_tokens=24, iterations=1),
        train=dataclasses.replace(base.train, steps=40, batch_size=8, log_every=5),
        optim=dataclasses.replace(base.optim, lr=1e-3, warmup_steps=2),
    )
