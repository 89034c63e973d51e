"""CPU quickstart for mixture of experts: `tiny` with each layer's MLP replaced by 8 SwiGLU experts, top 2.

Each expert is 384 wide, so a token's two experts hold exactly tiny's 768-wide MLP: the same active
parameters and matmul FLOPs per token as `tiny` (plus the 256 x 8 router), 2.4x its parameters in all.
The training settings are tiny's, so `jaxlm train moe_tiny` and `jaxlm train tiny` compare directly.
"""

import dataclasses

from jaxlm.configs import tiny
from jaxlm.core.config import Config


def config() -> Config:
    base = tiny.config()
    model = dataclasses.replace(base.model, num_experts=8, experts_per_token=2, expert_mlp_dim=384)
    return dataclasses.replace(base, name="moe_tiny", model=model)
