"""Optimizer and learning-rate schedule, from flat arguments."""

from __future__ import annotations

from typing import Any

import torch

from sd3booth.errors import UserError


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    prodigy: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """adamw (fused on CUDA), adamw8bit (bitsandbytes) or prodigy (prodigyopt, ``prodigy`` holds its options)."""
    if name == "adamw":
        # fused: one kernel for all LoRA tensors instead of a dozen per tensor (CUDA only)
        fused = bool(params) and params[0].is_cuda
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("--optimizer prodigy needs prodigyopt; pip install prodigyopt") from None
        return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **(prodigy or {}))
    raise UserError(f"--optimizer {name}: unknown; choose adamw, adamw8bit or prodigy")


def make_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, num_cycles: int, power: float
) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )
