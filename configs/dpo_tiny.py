"""DPO with LoRA on preference pairs (JSONL: prompt, chosen, rejected); set finetune.data and model.init_from
(the SFT run)."""

import dataclasses

from jaxlm.configs import sft_tiny


def config():
    base = sft_tiny.config()
    return dataclasses.replace(
        base, name="dpo_tiny", task="dpo", lora=sft_tiny.ADAPTERS,
        finetune=dataclasses.replace(base.finetune, data="prefs.jsonl", beta=0.1),
        optim=dataclasses.replace(base.optim, lr=5e-4, warmup_steps=10),
        train=dataclasses.replace(base.train, steps=60, seq_len=128),  # preference sets are small: sft_tiny's 1,000 would overfit
    )
