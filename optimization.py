"""Learning-rate schedules for pretraining and fine-tuning.

ELECTRA (google-research/electra, `model/optimization.py`, `create_optimizer`) decays the learning rate
linearly to 0 over *all* steps (`polynomial_decay`, power `lr_decay_power` = 1) and multiplies it by
`min(1, step / warmup_steps)`. transformers' `get_linear_schedule_with_warmup` instead starts the decay at the
end of warmup, so every post-warmup rate is higher (about 11% at 10% warmup). Both are offered; ELECTRA's is
the default of both trainers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

SCHEDULES = ("electra", "linear")
LR_DECAY_POWER = 1.0  # ELECTRA's `lr_decay_power`
# AdamW as ELECTRA pretrains (Clark et al. 2020, Table 6): no weight decay on biases and LayerNorm.
NO_DECAY_KEYS = ("LayerNorm", "layer_norm", "bias")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-6


def electra_lr_factor(step: int, num_warmup_steps: int, num_training_steps: int, power: float) -> float:
    """ELECTRA's multiplier of the peak learning rate at optimizer step `step`."""
    decay = (1.0 - min(step, num_training_steps) / max(1, num_training_steps)) ** power
    warmup = min(1.0, step / num_warmup_steps) if num_warmup_steps > 0 else 1.0
    return decay * warmup


def make_schedule(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    power: float = LR_DECAY_POWER,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`electra` (ELECTRA's, the default) or `linear` (transformers' linear schedule with warmup)."""
    if name == "electra":
        factor = partial(
            electra_lr_factor,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            power=power,
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "linear":
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    raise ValueError(f"learning-rate schedule must be one of {SCHEDULES}, got {name!r}")


def optimizer_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay everywhere except biases and LayerNorm (ELECTRA's exclusion list)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY_KEYS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
