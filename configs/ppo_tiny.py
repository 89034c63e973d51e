"""PPO (as in RLHF) with LoRA on the `tiny` backbone: a value head on the policy's final hidden states, 32
prompts per rollout with one completion each and two updates per rollout, per-token KL to the starting model
in the reward, GAE with gamma 1 and lambda 0.95, on the same built-in task as grpo_tiny. From the SFT demo
the mean reward of 10 rollouts rises from 0.53 to 0.75 by step 150 and ends at 0.69 (200 steps, about 10
minutes on 2 busy CPU cores): slower than GRPO, whose groups compare completions of the same prompt. Set
model.init_from (the run to improve); rl.prompts with rl.reward and/or rl.reward_model (a reward-model
run, whose score lands on each completion's last token) for your own task."""

import dataclasses

from jaxlm.configs import grpo_tiny


def config():
    base = grpo_tiny.config()
    return dataclasses.replace(
        base, name="ppo_tiny", task="ppo",
        model=dataclasses.replace(base.model, value_head=True),
        lora=dataclasses.replace(base.lora, targets=(*base.lora.targets, r"^value$")),
        rl=dataclasses.replace(base.rl, group_size=1, beta=0.05, iterations=2, vf_coef=0.1),
        train=dataclasses.replace(base.train, steps=2 * base.train.steps),
        optim=dataclasses.replace(base.optim, lr=2e-3),  # at GRPO's 1e-3, 0.52 -> 0.59 in 120 steps
    )
