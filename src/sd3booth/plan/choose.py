"""The memory planner: from a GiB budget to the fastest settings predicted to fit, before any model loads.

Pure Python (no torch) so that ``--max_vram`` prints its plan in a second. The prediction composes
* exact weight sizes, read from the checkpoint's safetensors headers (no weights are loaded), and
* per-stage coefficients measured by ``sd3booth bench`` (``calibration.json``; each entry names the run it
  came from): activation bytes per token and hidden unit, fixed overheads, and time ratios.

A plan covers every stage of a run: the three text encoders, VAE encode, class images, training and
validation sampling. Stage peaks are predicted separately; the run's peak is the largest.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sd3booth.errors import UserError
from sd3booth.plan.budget import Limits, allocator_cap, host_stages, swap_host_bytes, t5_fp16_extra_gib
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.rules import FLAGS, conflicts, nothing_fits
from sd3booth.plan.sizes import ModelSizes, read_sizes

GIB = 2**30
# T5 options by fidelity to bf16 (bench, H100: stream keeps bf16 weights, cosine 0.99992; int8 0.9989;
# nf4 0.943); encoding is a one-off of seconds, so among plans of equal step time and peak, fidelity decides.
T5_PREFERENCE = ("bf16", "stream", "cpu", "int8", "nf4")
# "none" (no T5 at all, zero embeddings as the reference pipeline does) is never chosen, only honoured.
SWAP_FP8_REASON = (
    "fp8 (e4m3, a power-of-two scale per row, upcast on the GPU): the frozen base of the swapped blocks is "
    "quantised (about 3% RMS error per weight) to halve their host RAM and copy time; chosen only when "
    "bf16 copies do not fit --max_ram, or asked for with --swap_dtype fp8"
)
T5_ORDER = (*T5_PREFERENCE, "none")
BASE_SPEED_ORDER = ("bf16", "fp8", "nf4")
# Issue #12's methods (tools/gpu_methods.sh measured LoRA, DoRA, LoHa, LoKr, text-encoder LoRA, EMA and the
# base-model prior on SD3 Medium, 2026-11-25, BENCHMARKS.md; LoHa/LoKr/EMA/prior within 0.15 GiB as below):
# bytes of optimizer state per fp32 adapter parameter (Adafactor factors its second moment: ~0 for LoRA shapes)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "lion": 4, "lion8bit": 1, "adafactor": 1,
                         "adamw_schedulefree": 8, "stableadamw": 8}  # fmt: skip
# saved activations relative to LoRA: DoRA keeps the adapted layers' base and LoRA outputs for its magnitude's
# gradient; LoHa/LoKr rebuild a full delta weight per layer, which autograd keeps (counted per adapted weight)
# DoRA's factor measured (H100, SD3 Medium, 1024 px, eager, 2026-11-25: training 11.21 GiB against LoRA's 8.87)
ADAPTER_ACTIVATION_FACTOR = {"lora": 1.0, "dora": 1.47, "loha": 1.0, "lokr": 1.0}
# bases an adapter cannot train on: DoRA reads the base weight (fp8 storage hides it), peft's LoHa/LoKr reshape
# their delta to the base weight's shape (NF4 packs it)
UNSUPPORTED_BASES = {"dora": ("fp8",), "loha": ("nf4",), "lokr": ("nf4",)}
# DoRA reads the base weights when it is added, before the swapper takes the fp8 host copies the loader made
FP8_SWAP_UNSUPPORTED = ("dora",)
# --train_text_encoder: CLIP-L (12 layers x 768) and CLIP-G (32 x 1280) run with grad on 77 tokens; activations
# ~34 bytes per hidden unit per layer in 16-bit (Korthikanti et al. 2022, no recomputation)
CLIP_UNITS_PER_TOKEN = 12 * 768 + 32 * 1280
CLIP_LORA_PARAMS_PER_RANK = 4 * 2 * (12 * 768 + 32 * 1280)  # q/k/v/out, A and B
# what the terms above missed, measured (same run: 12.38 GiB against 10.68 predicted); the CLIP encoders are the
# same in every SD3 model, so it is a constant
TEXT_ENCODER_MEASURED_EXTRA_GIB = 1.70


def compile_by_default(base: str, activation_offload: bool) -> bool:
    """Whether a plan compiles its blocks when ``--compile`` is not given (on a CUDA device): with bf16 weights
    and without activation offload. NF4/fp8 bases dequantise in hooks inside the block, which break the
    graph; activation offload's saved-tensor hooks are not traceable (each block would fall back to eager
    after paying the compilation)."""
    return base == "bf16" and not activation_offload


# ---- plans -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    base: str = "bf16"
    checkpoint_blocks: int = 0
    swap_blocks: int = 0
    activation_offload: bool = False
    t5: str = "bf16"
    text_batch: int = 8
    vae_tiling: bool = False
    compiled: bool = False  # transformer blocks under torch.compile (speed.CompiledBlocks)
    swap_dtype: str = "bf16"  # host copies of swapped blocks: "bf16" or "fp8" (e4m3 rows, upcast on the GPU)
    predicted: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> GiB
    predicted_s_per_step: float = field(default=0.0, compare=False)
    predicted_host: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> GiB of host RSS
    allocator_cap_gib: float = field(default=0.0, compare=False)  # the allocator's share of --max_vram (0: none)

    @property
    def peak(self) -> float:
        return max(self.predicted.values()) if self.predicted else 0.0

    @property
    def host_peak(self) -> float:
        return max(self.predicted_host.values()) if self.predicted_host else 0.0

    def describe(self) -> str:
        swap = f", {self.swap_blocks} block(s) swapped from CPU" if self.swap_blocks else ""
        offload = ", activations offloaded" if self.activation_offload else ""
        lines = [
            f"  transformer weights  {self.base}{swap}",
            *([f"  swapped host copies  {SWAP_FP8_REASON}"] if self.swap_blocks and self.swap_dtype == "fp8" else []),
            f"  checkpointing        {self.checkpoint_blocks} block(s){offload}",
            f"  T5                   {self.t5}, text batch {self.text_batch}",
            f"  VAE                  {'tiled' if self.vae_tiling else 'whole images'}",
            f"  blocks               {'compiled' if self.compiled else 'eager'}",
            "  predicted peak GiB   " + ", ".join(f"{k} {v:.2f}" for k, v in self.predicted.items()),
            f"  GPU allocator cap    {self.allocator_cap_gib:.2f} GiB (the rest of the budget: CUDA context, "
            "workspaces, kernels)" if self.allocator_cap_gib else "  GPU allocator cap    none",
            "  predicted host GiB   " + ", ".join(f"{k} {v:.2f}" for k, v in self.predicted_host.items()),
            f"  predicted s/step     {self.predicted_s_per_step:.3f} (relative to the calibration GPU)",
        ]  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# the fields that make a plan (the rest is its prediction)
PLAN_SETTINGS = tuple(f.name for f in fields(Plan) if f.compare)


@dataclass(frozen=True)
class Workload:
    resolution: int
    batch: int  # per step, prior-preservation images included
    t5_len: int
    rank: int
    lora_params: int
    optimizer: str
    validation: bool
    class_images: bool
    validation_batch: int = 1
    bf16: bool = True  # the GPU computes in bf16; else fp16 (T5's wo layers in fp32)
    on_gpu: bool = True
    adapter: str = "lora"
    text_encoder_rank: int = 0  # 0: no text-encoder LoRA
    ema_gpu: bool = False
    adapted_layers: int = 0  # Linear layers carrying the adapter
    train_size: tuple[int, int] | None = None  # the largest training image (w, h), e.g. a bucket; default square

    @property
    def tokens(self) -> int:
        w, h = self.train_size or (self.resolution, self.resolution)
        return (w // 16) * (h // 16) + 77 + self.t5_len


def _weight_gib(params: int, precision: str, cal: dict[str, Any]) -> float:
    return params * cal["bytes_per_param"][precision] / GIB


def predict(plan: Plan, sizes: ModelSizes, work: Workload, cal: dict[str, Any]) -> Plan:
    """Fills in the predicted per-stage peaks (GiB) and s/step of a plan."""
    c = cal["coefficients"]
    n, k, s = sizes.n_blocks, plan.checkpoint_blocks, plan.swap_blocks
    block = _weight_gib(sizes.block_params, plan.base, cal)
    # swapped blocks land in a ring of two device buffers; fp8 host copies also pass through one e4m3 buffer
    ring = (2 * block + (block / 2 if plan.swap_dtype == "fp8" else 0.0)) if s else 0.0
    resident = _weight_gib(sizes.other_params, "bf16", cal) + (n - s) * block + ring
    opt_bytes = OPTIMIZER_STATE_BYTES[work.optimizer] + (4 if work.ema_gpu else 0)
    lora = work.lora_params * (4 + 4 + opt_bytes) / GIB
    text = 0.0
    if work.text_encoder_rank:  # CLIP weights stay resident; their LoRA, its state and activations
        text = _weight_gib(sizes.clip_l_params + sizes.clip_g_params, "bf16", cal)
        text += CLIP_LORA_PARAMS_PER_RANK * work.text_encoder_rank * (4 + 4 + opt_bytes) / GIB
    units = work.batch * work.tokens * sizes.hidden / GIB  # GiB per byte-per-unit coefficient
    # compiled blocks save fewer intermediates (inductor fuses the elementwise work between matmuls)
    full = c["act_full_compiled"] if plan.compiled else c["act_full"]
    per_ckpt = c["act_checkpointed_compiled"] if plan.compiled else c["act_checkpointed"]
    saved_ckpt = 0.0 if plan.activation_offload else per_ckpt * k
    act = units * (full * (n - k) + saved_ckpt + (full if k else 0.0)) * ADAPTER_ACTIVATION_FACTOR[work.adapter]
    if work.adapter in ("loha", "lokr"):  # one bf16 hidden x hidden delta per adapted layer of an uncheckpointed block
        act += work.adapted_layers * (n - k) / n * sizes.hidden**2 * 2 / GIB
    stages: dict[str, float] = {}
    text_units = plan.text_batch / 8
    stages["CLIP-L"] = _weight_gib(sizes.clip_l_params, "bf16", cal) + c["clip_l_act_per8"] * text_units + c["fixed"]
    stages["CLIP-G"] = _weight_gib(sizes.clip_g_params, "bf16", cal) + c["clip_g_act_per8"] * text_units + c["fixed"]
    t5_act = c["t5_act_per8x256"] * text_units * work.t5_len / 256
    if plan.t5 in ("bf16", "int8", "nf4"):
        fp16_extra = t5_fp16_extra_gib(sizes, work.bf16, plan.t5)
        stages["T5"] = _weight_gib(sizes.t5_params, f"t5_{plan.t5}", cal) + fp16_extra + t5_act + c["fixed"]
    elif plan.t5 == "stream":  # accelerate streams one Linear at a time: a measured constant plus activations
        stages["T5"] = c["t5_stream_base"] + t5_act + c["fixed"]
    px = (work.train_size[0] * work.train_size[1] if work.train_size else work.resolution**2) / 1024**2
    tile_px = min(px, 0.25) if plan.vae_tiling else px
    vae_w = _weight_gib(sizes.vae_params, "bf16", cal)
    stages["VAE encode"] = vae_w + c["vae_encode_per_mpx"] * tile_px + c["fixed"]
    sample_act = units / work.batch * 2 * work.validation_batch * c["act_inference"]
    # decoding inside the pipeline costs more than a bare vae.decode (measured by the budget runs)
    decode = vae_w + (c["vae_decode_per_mpx"] + c.get("pipeline_decode_extra_per_mpx", 0.0)) * tile_px
    if work.class_images:
        stages["class images"] = resident + sample_act + decode + c["fixed"]
    base_extra = c["base_extra"].get(plan.base, 0.0) * units / c["base_extra_units"]  # dequant/upcast buffers
    text_act = (
        work.batch * 77 * CLIP_UNITS_PER_TOKEN * 34 / GIB + TEXT_ENCODER_MEASURED_EXTRA_GIB
        if work.text_encoder_rank
        else 0.0
    )
    stages["training"] = resident + lora + text + text_act + act + base_extra + c["fixed"]
    if work.validation:
        stages["validation"] = resident + lora + text + max(sample_act, decode) + c["fixed"]
    t = cal["time"]
    # The batch-1 step is bound by kernel launches, so time follows the block count more than the FLOPs
    # (measured: SD3.5 Large 0.659 s vs SD3 Medium 0.385 s, 38 vs 24 blocks); more tokens per step than a
    # 1024 px image cost less than their share (batch 4 measured 1.41x batch 1 eager, 2.0x compiled).
    fraction = t["launch_bound_fraction_compiled"] if plan.compiled else t["launch_bound_fraction"]
    base_t = (
        t["s_per_step_1024_bf16_full_ckpt"]
        * n
        / t["calibration_blocks"]
        * max(1.0, (work.batch * work.tokens) / (4096 + 154) * fraction)
    )
    ckpt_factor = 1 / (1 + t["checkpoint_overhead"]) * (1 + t["checkpoint_overhead"] * k / n)
    seconds = base_t * ckpt_factor * t["base_factor"][plan.base]
    if plan.compiled:  # compiled/eager step time, measured without and with full checkpointing
        seconds *= t["compiled_factor_none"] + (t["compiled_factor_all"] - t["compiled_factor_none"]) * k / n
    copy_s = 2 * s * sizes.block_params * swap_host_bytes(plan.base, plan.swap_dtype, cal) / (t["h2d_gbps"] * 1e9)
    seconds = max(seconds, copy_s) + t["swap_overhead_per_block"] * s
    if plan.activation_offload:
        seconds *= t["activation_offload_factor"]
    host = host_stages(plan, sizes, work.t5_len, work.bf16, cal, work.on_gpu)
    return replace(
        plan,
        predicted={k_: round(v, 3) for k_, v in stages.items()},
        predicted_s_per_step=round(seconds, 4),
        predicted_host=host,
    )


def candidates(sizes: ModelSizes, fixed: dict[str, Any]) -> list[Plan]:
    """Every plan the planner considers, with the settings the user fixed held at their values."""
    n = sizes.n_blocks
    options: dict[str, list[Any]] = {
        "base": list(BASE_SPEED_ORDER),
        "checkpoint_blocks": sorted({0, n // 4, n // 2, (3 * n) // 4, n}),
        "swap_blocks": sorted({0, *range(2, n + 1, 2), n}),
        "swap_dtype": ["bf16", "fp8"],
        "activation_offload": [False, True],
        "t5": list(T5_PREFERENCE),
        "text_batch": [8, 1],
        "vae_tiling": [False, True],
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
        if not conflicts(plan, n):
            out.append(plan)
    return out


def fixed_settings(cfg: Any, n_blocks: int) -> dict[str, Any]:
    """The plan fields the user set explicitly (a TrainConfig); the planner chooses the rest."""
    fixed: dict[str, Any] = {}
    if cfg.base_precision != "auto":
        fixed["base"] = cfg.base_precision
    if cfg.blocks_to_swap is not None:
        fixed["swap_blocks"] = min(cfg.blocks_to_swap, n_blocks)
    if cfg.swap_dtype != "auto":
        fixed["swap_dtype"] = cfg.swap_dtype
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
    return fixed


MARGIN_GIB = 0.5  # left free on the card by the default budget (other programs, driver growth)
RAM_MARGIN_GIB = 1.0  # left to the rest of the computer by the default --max_ram


def default_budget(available_gib: float | None) -> float:
    """The budget without --max_vram: the card's memory available to this run at start, less a margin."""
    return max(0.5, (available_gib if available_gib is not None else 16e9 / GIB) - MARGIN_GIB)


def default_ram(available_gib: float | None) -> float | None:
    """The host-RAM budget without --max_ram: the memory available at start, less a margin (None: unknown)."""
    return None if available_gib is None else max(1.0, available_gib - RAM_MARGIN_GIB)


@dataclass(frozen=True)
class Machine:
    """What the planner needs to know of the machine, measured by the caller (models.placement)."""

    gpu_available_gib: float | None = None  # the card's free memory at start plus this process's own (None: CPU)
    overhead_gib: float = 0.0  # whole-process GPU memory outside the allocator, measured at start (0: calibrated)
    bf16: bool = True
    ram_available_gib: float | None = None


def workload(cfg: Any, sizes: ModelSizes, machine: Machine, train_size: tuple[int, int] | None = None) -> Workload:
    """The run's workload; ``train_size`` is its largest training image (the largest aspect-ratio bucket)."""
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
    )


def plan_for_config(
    cfg: Any,
    root: Path,
    machine: Machine | None,
    cal: dict[str, Any] | None = None,
    train_size: tuple[int, int] | None = None,
) -> tuple[Plan, float]:
    """(plan, budget) for a run; on the CPU (machine None or without a GPU) only the user's fixed settings apply."""
    machine = machine or Machine()
    sizes = read_sizes(root, cfg.variant)
    fixed = fixed_settings(cfg, sizes.n_blocks)
    cal = cal or load_calibration()
    work = workload(cfg, sizes, machine, train_size)
    if machine.gpu_available_gib is None:  # the CPU: nothing compiles unless asked (its cost is never won back)
        plan = Plan(**{"t5": "bf16", "compiled": False, **fixed})
        return predict(plan, sizes, work, cal), 0.0
    budget = cfg.max_vram if cfg.max_vram is not None else default_budget(machine.gpu_available_gib)
    ram = cfg.max_ram if cfg.max_ram is not None else default_ram(machine.ram_available_gib)
    limits = Limits(vram_gib=budget, ram_gib=ram, overhead_gib=machine.overhead_gib, bf16=machine.bf16)
    return choose(sizes, work, limits, cal, fixed), budget


def _fits(p: Plan, limits: Limits, cal: dict[str, Any]) -> bool:
    ram_ok = limits.ram_gib is None or p.host_peak <= limits.ram_gib
    return p.peak <= p.allocator_cap_gib * cal["safety"] and ram_ok


def choose(sizes: ModelSizes, work: Workload, limits: Limits | float, cal: dict[str, Any],
           fixed: dict[str, Any] | None = None) -> Plan:  # fmt: skip
    """The plan with the least predicted s/step whose every stage is predicted to fit both budgets: the
    allocator peak within the card's budget less what the process holds outside the allocator, and the
    host peak within the RAM budget. ``limits`` may be a plain GiB number (GPU only, calibrated overhead).

    Among plans of the same step time T5's fidelity wins, then the lower host peak, the lower GPU peak, the
    larger text batch and whole-image VAE work.
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
        reason = conflicts(probe, sizes.n_blocks) or "no plan satisfies the settings given"
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
        raise UserError(nothing_fits(predicted, limits, work, cal))
    # fp8 host copies of swapped blocks quantise the frozen base: only when no plan with bf16 copies fits.
    # Equal speed: T5's fidelity (bf16 on the card, then streamed from host memory, then quantised: RAM that
    # fits the budget is worth more than embeddings), then the plan lighter on host memory, then on the GPU
    return min(fits, key=lambda p: (p.swap_dtype == "fp8", p.predicted_s_per_step, T5_ORDER.index(p.t5),
                                    round(p.host_peak, 1), p.peak, -p.text_batch, p.vae_tiling))  # fmt: skip
