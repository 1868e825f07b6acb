"""What every GPU measurement shares: synchronise, reset and read the peak, time steps, synthetic inputs, and
our transformer with a LoRA built the same way in every part."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

GIB = 2**30
RANK = 16  # LoRA rank of every measurement


def sync() -> None:
    torch.cuda.synchronize()


def reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak() -> float:
    """Peak allocated GiB since the last reset."""
    return torch.cuda.max_memory_allocated() / GIB


def reserved() -> float:
    """Peak reserved GiB since the last reset."""
    return torch.cuda.max_memory_reserved() / GIB


def allocated() -> float:
    return torch.cuda.memory_allocated() / GIB


def inputs(cfg: Any, res: int, batch: int, t5_len: int = 77, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic transformer inputs on the GPU: latents of ``res`` px, 77 CLIP + ``t5_len`` T5 tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lat = res // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    return dict(
        hidden_states=randn(batch, cfg["in_channels"], lat, lat),
        encoder_hidden_states=randn(batch, 77 + t5_len, cfg["joint_attention_dim"]),
        pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
        timestep=torch.full((batch,), 500.0, device="cuda"),
    )


def native_inputs(cfg: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """:func:`inputs` at the model's native size (1024 px for every SD3 model; smaller for ``tiny``)."""
    return inputs(cfg, cfg["sample_size"] * 8, batch, seed=seed)


def time_steps(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    """Median seconds of ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, peak GiB, seconds) of one call from a clean slate."""
    reset()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, peak(), time.perf_counter() - t0


def lora_step(
    model: Any, params: list, opt: Any, inp: dict[str, torch.Tensor], offload: bool = False
) -> Callable[[], None]:
    """One training step of a LoRA on synthetic inputs (bf16 autocast, squared-output loss)."""

    def step() -> None:
        saver = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
        with torch.autocast("cuda", dtype=torch.bfloat16), saver:
            out = model(**inp, return_dict=False)[0]
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def placement_for(dev: torch.device, t5: str = "bf16", **plan: Any) -> Any:
    """The Placement the trainer would decide for a memory plan with these fields (``plan.predict.Plan``: base,
    checkpoint_blocks, swap_blocks, activation_offload, vae_tiling...) on ``dev``, bf16 mixed precision."""
    from sd3booth.models.placement import decide, detect_device
    from sd3booth.plan.choose import Plan

    return decide(detect_device(dev), "bf16", Plan(t5=t5, **plan))


def our_lora_model(src: Any, place: Any, rank: int = RANK) -> tuple[Any, list[torch.Tensor]]:
    """Our loader's transformer with our LoRA on the default layers, its B non-zero and the same in every
    stack built here (so outputs, gradients and updates compare across options)."""
    from sd3booth.adapters import lora
    from sd3booth.config import DEFAULT_LORA_LAYERS
    from sd3booth.models import loaders

    torch.manual_seed(0)
    model = loaders.load_transformer(src, place)
    params = lora.add_lora(model, rank, rank, 0.0, lora.resolve_targets(model, list(DEFAULT_LORA_LAYERS), None))
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.01)
    return model, params
