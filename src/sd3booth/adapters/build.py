"""The trainable adapter on the SD3 transformer: LoRA, DoRA, LoHa or LoKr, all built with peft.

Why peft for all four rather than lycoris-lora for LoHa/LoKr: both libraries' weights map one to one onto the
keys ComfyUI reads without conversion (``hada_w1_a``…, ``lokr_w1``…, see ``formats``), so the file format
does not decide it; the module tree does. peft puts the adapter inside the transformer's own modules, so
accelerate/DDP, ``disable_adapters`` (the base-model prior), block swap (which moves only frozen Linear
weights), fp8 storage (which skips adapter modules) and per-block ``torch.compile`` see it like any other
layer. LyCORIS keeps its modules in a separate network that patches ``forward`` from outside the tree,
which none of those paths would see. lycoris-lora is used where it is the authority: reading the LoHa/LoKr
files back (``sd3booth generate``, and the tests' second consumer check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.config import PeftConfig

ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")


@dataclass(frozen=True)
class AdapterSpec:
    """What the user asked for, as flat values (config never reaches in here)."""

    kind: str = "lora"  # one of ADAPTER_TYPES
    rank: int = 4
    alpha: int = 4
    dropout: float = 0.0  # lora/dora input dropout
    lokr_factor: int = -1  # -1: near the square root of each dimension

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def peft_config(spec: AdapterSpec, targets: list[str]) -> PeftConfig:
    """The peft config of one adapter type. LoRA/DoRA start as the reference does (Gaussian A, zero B), LoHa and
    LoKr as peft initialises them (one factor zero), so every type starts at the base model exactly."""
    if spec.kind in ("lora", "dora"):
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=spec.kind == "dora",
        )
    if spec.kind == "loha":
        return LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets)
    if spec.kind == "lokr":
        return LoKrConfig(r=spec.rank, alpha=spec.alpha, decompose_factor=spec.lokr_factor, target_modules=targets)
    raise ValueError(f"unknown adapter type {spec.kind!r}; one of {', '.join(ADAPTER_TYPES)}")


def add_adapter(model: torch.nn.Module, spec: AdapterSpec, targets: list[str]) -> list[torch.nn.Parameter]:
    """Adds the trainable adapter to a diffusers model; returns its parameters, cast to fp32 (weights and optimizer
    state stay fp32 whatever the base precision)."""
    model.add_adapter(peft_config(spec, targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def adapter_kind(model: torch.nn.Module) -> str:
    """The adapter type a model carries (for messages and export)."""
    (config,) = model.peft_config.values()
    name = type(config).__name__
    if name == "LoraConfig":
        return "dora" if config.use_dora else "lora"
    return {"LoHaConfig": "loha", "LoKrConfig": "lokr"}[name]
