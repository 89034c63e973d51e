"""A reward model on the `tiny` backbone: a scalar head (model.num_labels=1) trained with the Bradley-Terry
loss on preference pairs (JSONL: prompt, chosen, rejected), LoRA on the attention and MLP with the head
adapted too. Set finetune.data, and model.init_from to the SFT (or pretrained) run to start from; its
language-model head is replaced by a fresh score head. Reports held-out pair accuracy."""

import dataclasses

from jaxlm.configs import sft_tiny


def config():
    base = sft_tiny.config()
    return dataclasses.replace(
        base, name="reward_tiny", task="reward",
        model=dataclasses.replace(base.model, num_labels=1),
        lora=dataclasses.replace(sft_tiny.ADAPTERS, targets=(*sft_tiny.ADAPTERS.targets, r"^score$"), alpha=16.0),
        finetune=dataclasses.replace(base.finetune, data="prefs.jsonl"),
        optim=dataclasses.replace(base.optim, lr=1e-3, warmup_steps=10),
        train=dataclasses.replace(base.train, steps=60, seq_len=128),  # preference sets are small: sft_tiny's 1,000 would overfit
    )
