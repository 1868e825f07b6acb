"""What the user's card and computer must hold: whole-process GPU memory and host RAM of a plan.

The allocator prediction of ``predict.predict`` counts the tensors PyTorch allocates. A card also holds what
no allocator counts: the CUDA context, cuBLAS/cuDNN workspaces and the code of compiled kernels (measured
0.8–1.3 GiB on an H100); ``--max_vram`` is a limit on all of it, as nvidia-smi shows it. So the allocator gets
what is left after that overhead (the run caps it there with ``set_per_process_memory_fraction``, so the
caching allocator behaves as on a card of that size) and a plan fits when its allocator peak fits the cap.

Host RAM (``--max_ram``) is planned the same way, stage by stage: the process itself (Python, torch, the
CUDA libraries), the weights a stage keeps in host memory (a streamed or CPU T5, the pinned copies of
swapped blocks) and what loading passes through host memory. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
# the one host buffer weights pass through on their way from a file to the GPU (models.reader): loading costs
# this much host memory, not the file's size
STAGING_BYTES = 64 * 2**20
# fp8 host copies of swapped blocks (--swap_dtype fp8): one e4m3 byte per weight; the per-row fp32 scales add
# 4 bytes per row (under 0.2% for SD3's 1536-2432 wide rows) and the biases stay bf16 (a few thousandths)
SWAP_FP8_BYTES = 1.0


@dataclass(frozen=True)
class Limits:
    """The two budgets a plan must meet and what the card costs besides the allocator."""

    vram_gib: float  # whole process on the card (nvidia-smi)
    ram_gib: float | None = None  # host RSS of the run's processes; None = not limited
    overhead_gib: float = 0.0  # context + library workspaces, measured on this card at start-up
    bf16: bool = True  # the card computes in bf16 (else the fp16 plan: T5's FFN output layers stay fp32)


def process_overhead(compiled: bool, measured_gib: float, cal: dict[str, Any]) -> float:
    """GiB on the card outside the allocator: the runtime's measured overhead (or the calibrated one when none
    was measured), plus compiled kernels' code and their autotuning workspaces when blocks are compiled."""
    p = cal["process"]
    runtime = measured_gib if measured_gib > 0 else p["runtime_overhead_gib"]
    return runtime + (p["compiled_extra_gib"] if compiled else 0.0)


def allocator_cap(limits: Limits, compiled: bool, cal: dict[str, Any]) -> float:
    """The allocator's share of the budget, GiB (what the run passes to set_per_process_memory_fraction)."""
    return max(0.0, limits.vram_gib - process_overhead(compiled, limits.overhead_gib, cal))


def swap_host_bytes(base: str, swap_dtype: str, cal: dict[str, Any]) -> float:
    """Host bytes per parameter of a swapped block's copy (and per parameter copied to the GPU per fetch)."""
    return SWAP_FP8_BYTES if swap_dtype == "fp8" else cal["bytes_per_param"].get(base, 2.0)


def swapped_host_gib(swap_blocks: int, base: str, swap_dtype: str, sizes: Any, cal: dict[str, Any]) -> float:
    """The swapped blocks' host copies, GiB: exact bytes, page-locked once (models.pinned: no power-of-two
    rounding, nothing cached)."""
    return swap_blocks * sizes.block_params * swap_host_bytes(base, swap_dtype, cal) / GIB


def host_stages(
    plan: Any,
    sizes: Any,
    t5_len: int,
    bf16: bool,
    cal: dict[str, Any],
    on_gpu: bool = True,
    compile_cached: bool = False,
) -> dict[str, float]:
    """Predicted host RSS per stage, GiB.

    Loading reads the weight files with plain reads through one staging buffer (models.reader), so a component
    loaded onto the GPU costs the staging buffer, not its file; the bitsandbytes paths (int8/NF4) still load
    through the libraries, which map every file of the component while it loads (measured), so those cost
    their file size for that moment (exact, from the checkpoint). What stays in host memory:
    * T5 ``stream``: accelerate keeps every layer in host memory and copies each in as it runs (bf16);
      ``cpu``: T5 runs there (bf16 next to a GPU, fp32 on a CPU-only machine);
    * swapped blocks: their frozen weights in exact-size pinned buffers, read from the file straight into them
      (bf16, or fp8 rows: :func:`swap_host_bytes`), and ``host.pinned_overhead_per_gib`` of RSS per GiB of them;
      the rest of the transformer goes to the GPU;
    * compiled blocks: inductor's compile workers, while the first step compiles them; ``compile_cached``: the
      blocks are in the persistent compile cache already, so the first step loads them and the workers stay
      idle (measured: ~0.9 GiB less, 2026-11-25-h100-process-host.json). The planner assumes a first run.
    """
    h = cal["host"]
    base = h["process_gib"] + (h["cuda_libs_gib"] if on_gpu else 0.0)
    staging = STAGING_BYTES / GIB
    mapped = {k: v / GIB for k, v in (getattr(sizes, "file_bytes", {}) or {}).items()}
    swap_dtype = getattr(plan, "swap_dtype", "bf16")
    pinned = swapped_host_gib(plan.swap_blocks, plan.base, swap_dtype, sizes, cal)
    # what page-locked packs cost in RSS beyond their bytes: fitted (bench.fit.fit_process_host), not derived;
    # it could be page tables and the driver's registration bookkeeping of the pinned ranges, or allocator slack
    # that grows with the packs (0.016 +- 0.015 GiB/GiB from the five H100 runs: small, and barely measured)
    packs = pinned * (1 + h["pinned_overhead_per_gib"])
    out: dict[str, float] = {"CLIP-G": base + staging}
    t5_bytes = sizes.t5_params * (2 if on_gpu else 4)
    if plan.t5 in ("stream", "cpu"):
        out["T5"] = base + t5_bytes / GIB + h["t5_act_per_token_gib"] * t5_len
    elif plan.t5 in ("int8", "nf4"):
        out["T5"] = base + mapped.get("text_encoder_3", t5_bytes / GIB)
    elif plan.t5 != "none":
        out["T5"] = base + staging
    if plan.base == "nf4" and on_gpu:
        load = mapped.get("transformer", sizes.transformer_params * 2 / GIB)
    else:
        load = packs + staging
        if plan.base == "fp8" and plan.swap_blocks:  # bf16 host copies, then fp8 casts of them, then the packs
            load += swapped_host_gib(plan.swap_blocks, "bf16", "bf16", sizes, cal) + pinned
    compiles = plan.compiled and not compile_cached
    workers = h["compile_worker_gib"] * h["compile_workers"] if compiles else 0.0
    out["training"] = base + max(load, packs + workers + h["training_extra_gib"])
    return {k: round(v, 3) for k, v in out.items()}


def t5_fp16_extra_gib(sizes: Any, bf16: bool, mode: str = "bf16") -> float:
    """Without bf16, T5 runs in fp16 with its FFN output projections (``wo``) kept in fp32 (and unquantised)
    by transformers, as fp16 overflows there: measured 7.49 GiB for the int8 T5 stage instead of 5.7."""
    if bf16 or mode not in ("bf16", "int8", "nf4"):
        return 0.0
    # bytes the wo weights would have had: bf16 2; int8 measured 2.1 (7.49 - 5.71 GiB on the H100 fp16 run
    # of 2026-11-25 over 1.007e9 wo weights); nf4 taken as int8 (not measured)
    stored = {"bf16": 2.0, "int8": 2.1, "nf4": 2.1}[mode]
    return sizes.t5_wo_params * (4 - stored) / GIB


MARGIN_GIB = 0.5  # left free on the card by the default budget (other programs, driver growth)
RAM_MARGIN_GIB = 1.0  # left to the rest of the computer by the default --max_ram


def default_budget(available_gib: float | None) -> float:
    """The budget without --max_vram: the card's memory available to this run at start, less a margin."""
    return max(0.5, (available_gib if available_gib is not None else 16e9 / GIB) - MARGIN_GIB)


def default_ram(available_gib: float | None) -> float | None:
    """The host-RAM budget without --max_ram: the memory available at start, less a margin (None: unknown)."""
    return None if available_gib is None else max(1.0, available_gib - RAM_MARGIN_GIB)
