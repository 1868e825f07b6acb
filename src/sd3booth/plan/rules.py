"""The rules of the planner's choice: which combinations of memory settings cannot run together, and the
message when no plan fits. Pure Python; plans are read by attribute (``plan.choose.Plan``)."""

from __future__ import annotations

from typing import Any

# flag names of the plan fields, for messages
FLAGS = {
    "base": "--base_precision",
    "checkpoint_blocks": "--checkpoint_blocks/--gradient_checkpointing",
    "swap_blocks": "--blocks_to_swap",
    "swap_dtype": "--swap_dtype",
    "activation_offload": "--activation_offload",
    "t5": "--t5_precision",
    "vae_tiling": "--vae_tiling",
    "compiled": "--compile",
}


def conflicts(plan: Any, n: int) -> str | None:
    """Why a combination cannot run (None when it can): swapped blocks are recomputed, so they need
    checkpointing; NF4 weights are not swapped; fp8 storage only pays with full checkpointing; activation
    offload moves what checkpointing saves."""
    k, s = plan.checkpoint_blocks, plan.swap_blocks
    if s > k:
        return f"{FLAGS['swap_blocks']} {s} needs at least as many checkpointed blocks (now {k})"
    if plan.base == "nf4" and s:
        return f"{FLAGS['base']} nf4 cannot be combined with {FLAGS['swap_blocks']}"
    if plan.swap_dtype == "fp8" and plan.base != "bf16":
        return f"{FLAGS['swap_dtype']} fp8 quantises a bf16 base; {FLAGS['base']} {plan.base} is stored quantised"
    if plan.base == "fp8" and k < n:
        return f"{FLAGS['base']} fp8 needs every block checkpointed ({k} of {n} now)"
    if plan.activation_offload and not k:
        return f"{FLAGS['activation_offload']} needs checkpointed blocks"
    return None


def nothing_fits(predicted: list[Any], limits: Any, work: Any, cal: dict[str, Any]) -> str:
    """One line: which budget is too small for every plan, and what to do."""
    gpu_ok = [p for p in predicted if p.peak <= p.allocator_cap_gib * cal["safety"]]
    if gpu_ok and limits.ram_gib is not None:
        least = min(gpu_ok, key=lambda p: p.host_peak)
        return (
            f"--max_ram {limits.ram_gib:g} GiB is below what the plans that fit --max_vram {limits.vram_gib:g} "
            f"need in host memory (at least {least.host_peak:.2f} GiB predicted); raise --max_ram, free memory, "
            "or raise --max_vram so less is kept in host memory"
        )
    smallest = min(predicted, key=lambda p: p.peak + (limits.vram_gib - p.allocator_cap_gib))
    need = smallest.peak / cal["safety"] + (limits.vram_gib - smallest.allocator_cap_gib)
    return (
        f"--max_vram {limits.vram_gib:g} GiB is below what this model needs at resolution {work.resolution} "
        f"(at least {need:.2f} GiB predicted for the whole process with the settings given); raise "
        "--max_vram, lower --resolution or --train_batch_size, or leave the memory settings to the planner"
    )
