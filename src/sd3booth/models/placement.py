"""Where and in which precision each stage runs: decided once, from the device, the settings and the memory plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sd3booth.errors import UserError

# ---- placement and precision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and in which precision each stage runs: the one object every stage asks. Built by
    :func:`plan_placement` from the device, the precision flags and the memory plan (``plan.Plan``)."""

    device: torch.device
    weight_dtype: torch.dtype  # compute dtype of the frozen transformer (its storage too when base is bf16)
    mixed_precision: str  # "no" | "fp16" | "bf16" (autocast; LoRA params stay fp32)
    text_dtype: torch.dtype  # CLIP encoders
    t5_precision: str  # bf16 | int8 | nf4 | stream | cpu | none
    vae_dtype: torch.dtype
    base: str = "bf16"  # transformer storage: bf16 (= weight_dtype) | fp8 | nf4
    checkpoint_blocks: int = 0
    swap_blocks: int = 0
    activation_offload: bool = False
    vae_tiling: bool = False
    text_batch: int = 8

    @property
    def t5_device(self) -> torch.device:
        return torch.device("cpu") if self.t5_precision == "cpu" else self.device


def default_mixed_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def plan_placement(device: torch.device, mixed_precision: str | None, t5_precision: str, plan: Any = None) -> Placement:
    """Decides every dtype and placement from the device, the user's precision flags and the memory plan."""
    mp = mixed_precision or default_mixed_precision(device)
    t5 = plan.t5 if plan is not None else ("bf16" if t5_precision == "auto" else t5_precision)
    base = plan.base if plan is not None else "bf16"
    if device.type != "cuda":
        if t5 in ("int8", "nf4") or base == "nf4":
            raise UserError("NF4 and int8 weights need a CUDA GPU (bitsandbytes); use bf16 or cpu on this machine")
        if mp == "fp16":
            raise UserError("--mixed_precision fp16 needs a GPU; use no or bf16 on the CPU")
        if t5 == "stream":
            t5 = "cpu"  # nothing to stream to
    weight = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # The SD3 VAE overflows in fp16, so it stays fp32 there (as the reference does) and bf16 otherwise.
    vae = torch.float32 if mp in ("no", "fp16") else torch.bfloat16
    extra: dict[str, Any] = {}
    if plan is not None:
        extra = dict(
            base=base,
            checkpoint_blocks=plan.checkpoint_blocks,
            swap_blocks=plan.swap_blocks,
            activation_offload=plan.activation_offload,
            vae_tiling=plan.vae_tiling,
            text_batch=plan.text_batch,
        )
    return Placement(
        device=device,
        weight_dtype=weight,
        mixed_precision=mp,
        text_dtype=weight,
        t5_precision=t5,
        vae_dtype=vae,
        **extra,
    )
