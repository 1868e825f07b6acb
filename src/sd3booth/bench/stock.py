"""``bench --parts stock``: the stock stack of the notes (diffusers transformer + peft LoRA + bitsandbytes
AdamW8bit, bf16 autocast, gradient checkpointing, eager), the yardstick every other number is read against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sd3booth.bench.harness import RANK, allocated, inputs, lora_step, peak, reserved, reset, time_steps


def stock_stack(model_dir: Path, rank: int, checkpointing: bool) -> tuple[Any, list[torch.Tensor], Any]:
    """(model, LoRA params, optimizer) of the recipe behind the notes' stock numbers, written the way the
    diffusers example writes it: bf16 base, peft LoRA in fp32, bitsandbytes AdamW8bit."""
    import bitsandbytes as bnb
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from sd3booth.config import DEFAULT_LORA_LAYERS

    model = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.bfloat16).to("cuda")
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(DEFAULT_LORA_LAYERS))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, params, bnb.optim.AdamW8bit(params, lr=1e-4)


def bench_stock(model_dir: Path, resolutions: list[int], steps: int, rank: int = RANK) -> list[dict[str, Any]]:
    """The stock stack's training step (with checkpointing) at each resolution."""
    rows = []
    for res in resolutions:
        reset()
        model, params, opt = stock_stack(model_dir, rank, True)
        weights = allocated()
        s = time_steps(lora_step(model, params, opt, inputs(model.config, res, 1)), steps)
        rows.append(
            {
                "stack": "stock",
                "resolution": res,
                "weights_gib": round(weights, 3),
                "peak_gib": round(peak(), 3),
                "reserved_gib": round(reserved(), 3),
                "s_per_step": round(s, 4),
            }
        )
        del model, params, opt
    reset()
    return rows
