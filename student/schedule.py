"""Optimiser and learning-rate schedule of GLIP training.

AdamW with a separate learning rate for the language encoder (official SOLVER.BASE_LR 1e-4, LANG_LR 1e-5),
no weight decay on norms, biases and the head's scalar parameters, linear warm-up from ``warmup_factor`` and a
cosine decay to ``final_factor`` of the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    text_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 2000
    warmup_factor: float = 1e-3
    final_factor: float = 0.01
    clip_grad_norm: float = 1.0  # official: full-model L2 clipping at 1.0


def parameter_groups(model: nn.Module, config: OptimConfig, text_prefix: str = "text_encoder.") -> list[dict]:
    """Four groups: (vision|text) x (decay|no decay). Frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_text = name.startswith(text_prefix)
        no_decay = parameter.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((is_text, no_decay), []).append(parameter)
    result = []
    for (is_text, no_decay), parameters in sorted(groups.items()):
        result.append(
            {
                "params": parameters,
                "lr": config.text_lr if is_text else config.lr,
                "weight_decay": 0.0 if no_decay else config.weight_decay,
                "name": f"{'text' if is_text else 'vision'}{'_no_decay' if no_decay else ''}",
            }
        )
    return result


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, config), betas=(0.9, 0.999))


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < config.warmup_steps:
        alpha = step / max(1, config.warmup_steps)
        return config.warmup_factor * (1 - alpha) + alpha
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.final_factor + (1 - config.final_factor) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
