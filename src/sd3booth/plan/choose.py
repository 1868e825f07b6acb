"""The memory planner: from a GiB budget to the fastest settings predicted to fit, before any model loads.

Pure Python (no torch) so that ``--max_vram`` prints its plan in a second. The prediction (``predict``) composes
* exact weight sizes, read from the checkpoint's safetensors headers (no weights are loaded), and
* per-stage coefficients measured by ``sd3booth bench`` (``calibration.json``; each entry names the run it
  came from): activation bytes per token and hidden unit, fixed overheads, and time ratios.

A plan covers every stage of a run: the three text encoders, VAE encode, class images, training and
validation sampling. Stage peaks are predicted separately; the run's peak is the largest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sd3booth.errors import UserError
from sd3booth.plan.budget import Limits, allocator_cap, default_budget, default_ram
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.predict import GIB, Plan, Workload, predict
from sd3booth.plan.sizes import ModelSizes, read_sizes
from sd3booth.plan.terms import FP8_SWAP_UNSUPPORTED, UNSUPPORTED_BASES

__all__ = ["GIB", "PLAN_SETTINGS", "Machine", "Plan", "Workload", "choose", "plan_for_config", "predict"]
# T5 options by fidelity to bf16 (bench, H100: stream keeps bf16 weights, cosine 0.99992; int8 0.9989;
# nf4 0.943); encoding is a one-off of seconds, so among plans of equal step time and peak, fidelity decides.
T5_PREFERENCE = ("bf16", "stream", "cpu", "int8", "nf4")
# "none" (no T5 at all, zero embeddings as the reference pipeline does) is never chosen, only honoured.
T5_ORDER = (*T5_PREFERENCE, "none")
BASE_SPEED_ORDER = ("bf16", "fp8", "nf4")


def compile_by_default(base: str, activation_offload: bool) -> bool:
    """Whether a plan compiles its blocks when ``--compile`` is not given (on a CUDA device): with bf16 weights
    and without activation offload. NF4/fp8 bases dequantise in hooks inside the block, which break the
    graph; activation offload's saved-tensor hooks are not traceable (each block would fall back to eager
    after paying the compilation)."""
    return base == "bf16" and not activation_offload


# the fields that make a plan (the rest is its prediction)
PLAN_SETTINGS = tuple(f.name for f in fields(Plan) if f.compare)


def candidates(sizes: ModelSizes, fixed: dict[str, Any]) -> list[Plan]:
    """Every plan the planner considers, with the settings the user fixed held at their values."""
    n = sizes.n_blocks
    options: dict[str, list[Any]] = {
        "base": list(BASE_SPEED_ORDER),
        "checkpoint_blocks": sorted({0, n // 4, n // 2, (3 * n) // 4, n}),
        "swap_blocks": sorted({0, *range(2, n + 1, 2), n}),
        "activation_offload": [False, True],
        "t5": list(T5_PREFERENCE),
        "text_batch": [8, 1],
        "vae_tiling": [False, True],
        "swap_dtype": ["bf16", "fp8"],
    }
    for key, value in fixed.items():
        options[key] = [value]
    out = []
    for values in itertools.product(*options.values()):
        plan = Plan(**dict(zip(options, values)))
        if plan.swap_dtype == "fp8" and not plan.swap_blocks:  # nothing swapped: no host copies to store
            if "swap_dtype" not in fixed:
                continue
            plan = replace(plan, swap_dtype="bf16")
        if "compiled" not in fixed:
            plan = replace(plan, compiled=compile_by_default(plan.base, plan.activation_offload))
        graphs = [fixed["cuda_graphs"]] if "cuda_graphs" in fixed else [True, False]
        out += [p for p in (replace(plan, cuda_graphs=g) for g in graphs) if not _conflicts(p, n)]
    return out


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
    "cuda_graphs": "--cuda_graphs",
}


def _conflicts(plan: Plan, n: int) -> str | None:
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
    if plan.cuda_graphs and not (plan.compiled and k == 0 and s == 0):
        # a graph replays fixed addresses: swapped weights move, a checkpoint recompute re-enters a block
        return f"{FLAGS['cuda_graphs']} needs compiled blocks without checkpointing or block swap"
    return None


def fixed_settings(cfg: Any, n_blocks: int) -> dict[str, Any]:
    """The plan fields the user set explicitly (a TrainConfig); the planner chooses the rest."""
    fixed: dict[str, Any] = {}
    if cfg.base_precision != "auto":
        fixed["base"] = cfg.base_precision
    if cfg.blocks_to_swap is not None:
        fixed["swap_blocks"] = min(cfg.blocks_to_swap, n_blocks)
    if cfg.checkpoint_blocks is not None:
        fixed["checkpoint_blocks"] = min(cfg.checkpoint_blocks, n_blocks)
    elif cfg.gradient_checkpointing:
        fixed["checkpoint_blocks"] = n_blocks
    if cfg.activation_offload is not None:
        fixed["activation_offload"] = cfg.activation_offload
    if cfg.vae_tiling is not None:
        fixed["vae_tiling"] = cfg.vae_tiling
    if cfg.t5_precision != "auto":
        fixed["t5"] = cfg.t5_precision
    if cfg.compile is not None:
        fixed["compiled"] = cfg.compile
    if cfg.swap_dtype != "auto":
        fixed["swap_dtype"] = cfg.swap_dtype
    if cfg.cuda_graphs is not None:
        fixed["cuda_graphs"] = cfg.cuda_graphs
    if cfg.base_compute == "fp8":  # fp8 compute quantises the resident bf16 weights: none may be swapped
        fixed.update(base="bf16", swap_blocks=0)
    return fixed


@dataclass(frozen=True)
class Machine:
    """What the planner needs to know of the machine, measured by the caller (models.placement)."""

    gpu_available_gib: float | None = None  # the card's free memory at start plus this process's own (None: CPU)
    overhead_gib: float = 0.0  # whole-process GPU memory outside the allocator, measured at start (0: calibrated)
    bf16: bool = True
    ram_available_gib: float | None = None


def workload(
    cfg: Any, sizes: ModelSizes, machine: Machine, train_size: tuple[int, int] | None = None, shapes: int = 1
) -> Workload:
    """The run's workload; ``train_size`` is its largest training image (the largest aspect-ratio bucket) and
    ``shapes`` the number of distinct batch shapes its data gives (counted by the caller from the data)."""
    n_targets = len(cfg.target_blocks) if cfg.target_blocks else sizes.n_blocks
    lora_params = n_targets * len(cfg.target_layers) * 2 * cfg.rank * sizes.hidden
    lora_params *= {"loha": 2.0, "lokr": 0.5}.get(cfg.adapter_type, 1.0)  # LoKr: rough, depends on the factor
    return Workload(
        resolution=cfg.resolution,
        batch=cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1),
        t5_len=cfg.max_sequence_length,
        rank=cfg.rank,
        lora_params=int(lora_params),
        optimizer=cfg.optimizer_name,
        validation=bool(cfg.validation_prompt or cfg.validation_prompt_file),
        class_images=cfg.class_images,
        bf16=machine.bf16,
        on_gpu=machine.gpu_available_gib is not None,
        adapter=cfg.adapter_type,
        text_encoder_rank=(cfg.text_encoder_rank or cfg.rank) if cfg.train_text_encoder else 0,
        ema_gpu=cfg.use_ema and cfg.ema_device == "gpu",
        adapted_layers=n_targets * len(cfg.target_layers),
        train_size=train_size,
        shapes=shapes,
    )


def plan_for_config(
    cfg: Any,
    root: Path,
    machine: Machine | None,
    cal: dict[str, Any] | None = None,
    train_size: tuple[int, int] | None = None,
    shapes: int = 1,
) -> tuple[Plan, float]:
    """(plan, budget) for a run; on the CPU (machine None or without a GPU) only the user's fixed settings apply.
    ``train_size`` and ``shapes``: the largest training image and the number of batch shapes (see workload)."""
    machine = machine or Machine()
    sizes = read_sizes(root, cfg.variant)
    fixed = fixed_settings(cfg, sizes.n_blocks)
    cal = cal or load_calibration()
    work = workload(cfg, sizes, machine, train_size, shapes)
    if machine.gpu_available_gib is None:  # the CPU: nothing compiles unless asked (its cost is never won back)
        plan = Plan(**{"t5": "bf16", "compiled": False, **fixed, "cuda_graphs": False})
        return predict(plan, sizes, work, cal), 0.0
    budget = cfg.max_vram if cfg.max_vram is not None else default_budget(machine.gpu_available_gib)
    ram = cfg.max_ram if cfg.max_ram is not None else default_ram(machine.ram_available_gib)
    limits = Limits(vram_gib=budget, ram_gib=ram, overhead_gib=machine.overhead_gib, bf16=machine.bf16)
    return choose(sizes, work, limits, cal, fixed), budget


def _fits(p: Plan, limits: Limits, cal: dict[str, Any]) -> bool:
    ram_ok = limits.ram_gib is None or p.host_peak <= limits.ram_gib
    return p.need <= p.allocator_cap_gib * cal["safety"] and ram_ok


def choose(sizes: ModelSizes, work: Workload, limits: Limits | float, cal: dict[str, Any],
           fixed: dict[str, Any] | None = None) -> Plan:  # fmt: skip
    """The plan with the least predicted s/step whose every stage is predicted to fit both budgets: the
    allocator peak within the card's budget less what the process holds outside the allocator, and the
    host peak within the RAM budget. ``limits`` may be a plain GiB number (GPU only, calibrated overhead).

    Among plans of the same step time T5's fidelity wins, then whole-image VAE work, the lower host peak, the
    lower GPU peak and the larger text batch.
    """
    limits = limits if isinstance(limits, Limits) else Limits(vram_gib=float(limits))
    fixed = fixed or {}
    plans = [
        p
        for p in candidates(sizes, fixed)
        if p.base not in UNSUPPORTED_BASES.get(work.adapter, ())
        and not (p.swap_dtype == "fp8" and work.adapter in FP8_SWAP_UNSUPPORTED)
    ]
    if not plans:  # the user's own settings exclude each other: name them rather than blame the budget
        probe = Plan(**fixed)
        reason = _conflicts(probe, sizes.n_blocks) or "no plan satisfies the settings given"
        given = ", ".join(f"{FLAGS.get(k, k)}={v}" for k, v in fixed.items())
        raise UserError(
            f"conflicting memory settings ({given}): {reason}; change one of them or leave it to the planner"
        )
    predicted = [
        replace(p, allocator_cap_gib=round(allocator_cap(limits, p.compiled, cal), 3))
        for p in (predict(plan, sizes, work, cal) for plan in plans)
    ]
    fits = [p for p in predicted if _fits(p, limits, cal)]
    if not fits:
        raise UserError(_nothing_fits(predicted, limits, work, cal))
    # fp8 host copies of swapped blocks quantise the frozen base: only when no plan with bf16 copies fits.
    # Equal speed: T5's fidelity (bf16 on the card, then streamed from host memory, then quantised: RAM that
    # fits the budget is worth more than embeddings), whole-image VAE work, then the plan lighter on host memory,
    # then on the GPU
    return min(fits, key=lambda p: (p.swap_dtype == "fp8", p.predicted_s_per_step, T5_ORDER.index(p.t5), p.vae_tiling,
                                    round(p.host_peak, 1), p.need, -p.text_batch))  # fmt: skip


def _nothing_fits(predicted: list[Plan], limits: Limits, work: Workload, cal: dict[str, Any]) -> str:
    gpu_ok = [p for p in predicted if p.need <= p.allocator_cap_gib * cal["safety"]]
    if gpu_ok and limits.ram_gib is not None:
        least = min(gpu_ok, key=lambda p: p.host_peak)
        return (
            f"--max_ram {limits.ram_gib:g} GiB is below what the plans that fit --max_vram {limits.vram_gib:g} "
            f"need in host memory (at least {least.host_peak:.2f} GiB predicted); raise --max_ram, free memory, "
            "or raise --max_vram so less is kept in host memory"
        )
    smallest = min(predicted, key=lambda p: p.need + (limits.vram_gib - p.allocator_cap_gib))
    need = smallest.need / cal["safety"] + (limits.vram_gib - smallest.allocator_cap_gib)
    costly = _costly_choices(work)
    return (
        f"--max_vram {limits.vram_gib:g} GiB is below what this model needs at resolution {work.resolution} "
        f"(at least {need:.2f} GiB predicted for the whole process with the settings given); raise "
        f"--max_vram, lower --resolution or --train_batch_size{', ' + costly if costly else ''}, or leave the "
        "memory settings to the planner"
    )


def _costly_choices(work: Workload) -> str:
    """The choices of the run that cost GPU memory beyond plain LoRA, as the hint names them."""
    out = []
    if work.text_encoder_rank:
        out.append("drop --train_text_encoder")
    if work.adapter == "dora":
        out.append("use --lora_type lora instead of dora")
    if work.ema_gpu:
        out.append("use --ema_device cpu")
    if work.shapes > 1:
        out.append(f"use fewer aspect-ratio buckets ({work.shapes} batch shapes; --no-enable_bucket: one)")
    return ", ".join(out)
