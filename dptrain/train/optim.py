"""create_optimizer and create_schedule: config names → torch optimizers and learning-rate schedules."""

from __future__ import annotations

import torch

from dptrain.errors import lookup

# name → factory(trainable parameters, optimizer config)
OPTIMIZERS = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay),
}

# name → factory(optimizer, steps of the run) → a scheduler stepped once per optimizer step, or None.
# The lr only depends on the step count, not on the data: post-processing, free under DP.
SCHEDULES = {
    "constant": lambda optimizer, steps: None,
    "cosine": lambda optimizer, steps: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps)),
}


def create_optimizer(o, model) -> torch.optim.Optimizer:
    """o: an OptimizerConfig; only the model's trainable parameters are optimised."""
    factory = lookup("optimizer", o.name, OPTIMIZERS)
    return factory([p for p in model.parameters() if p.requires_grad], o)


def create_schedule(name: str, optimizer, steps: int):
    """Learning-rate schedule over the run's optimizer steps (one per logical batch); None: constant."""
    return lookup("optimizer.schedule", name, SCHEDULES)(optimizer, steps)
