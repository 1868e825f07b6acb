"""Optimizer and learning-rate schedule, from flat arguments.

Every optimizer comes from a maintained package: torch (AdamW), bitsandbytes (AdamW8bit, Lion, Lion8bit),
prodigyopt (Prodigy), transformers (Adafactor), schedulefree (AdamWScheduleFree) and torch-optimi
(StableAdamW: AdamW with per-tensor update clipping, SimpleTuner's recommendation for SD3.5 Large).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from sd3booth.errors import UserError

# optimizer -> (module, class, pip package)
_SOURCES = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion": ("bitsandbytes.optim", "Lion", "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "stableadamw": ("optimi", "StableAdamW", "torch-optimi"),
}


def _load(name: str) -> Any:
    module, cls, package = _SOURCES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(f"--optimizer {name} needs {package}; pip install {package}") from None


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter] | list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    options: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """``params`` is a list of parameters or of param groups (a group may carry its own ``lr``); ``options``
    holds the optimizer's own settings (Prodigy's, Lion's betas, Adafactor's, schedule-free's)."""
    opts = dict(options or {})
    if name == "adamw":
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
        # fused: one kernel for all LoRA tensors instead of a dozen per tensor (CUDA only)
        fused = first is not None and first.is_cuda
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)
    if name not in _SOURCES:
        raise UserError(f"--optimizer {name}: unknown; choose one of adamw, {', '.join(_SOURCES)}")
    cls = _load(name)
    if name in ("adamw8bit", "stableadamw"):
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **opts)
    if name in ("lion", "lion8bit"):
        return cls(params, lr=lr, betas=opts.get("betas", (0.9, 0.99)), weight_decay=weight_decay)
    if name == "adafactor":
        # an explicit learning rate unless --adafactor_relative_step (then lr must be None for transformers)
        opts = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **opts}
        return cls(params, lr=None if opts["relative_step"] else lr, weight_decay=weight_decay, **opts)
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **opts)  # adamw_schedulefree


def optimizer_options(name: str, cfg: Any) -> dict[str, Any]:
    """The optimizer's own settings from a TrainConfig (the run setup maps settings; this keeps the table)."""
    if name == "prodigy":
        return dict(
            beta3=cfg.prodigy_beta3,
            decouple=cfg.prodigy_decouple,
            use_bias_correction=cfg.prodigy_use_bias_correction,
            safeguard_warmup=cfg.prodigy_safeguard_warmup,
        )
    if name in ("lion", "lion8bit"):
        return {"betas": (cfg.lion_beta1, cfg.lion_beta2)}
    if name == "adafactor":
        return dict(
            relative_step=cfg.adafactor_relative_step,
            scale_parameter=cfg.adafactor_scale_parameter,
            warmup_init=cfg.adafactor_warmup_init,
            clip_threshold=cfg.adafactor_clip_threshold,
            decay_rate=cfg.adafactor_decay_rate,
        )
    if name == "adamw_schedulefree":
        warmup = cfg.lr_warmup_steps if cfg.lr_scheduler == "constant_with_warmup" else 0
        return dict(r=cfg.schedulefree_r, weight_lr_power=cfg.schedulefree_weight_lr_power, warmup_steps=warmup)
    return {}


def schedule_name(optimizer: str, lr_scheduler: str) -> str:
    """Schedule-free optimizers warm up themselves (``optimizer_options``) and want a constant rate."""
    return "constant" if optimizer == "adamw_schedulefree" else lr_scheduler


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
