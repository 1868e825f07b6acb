"""The prediction of one plan: per-stage peaks of the allocator (GiB), host RSS and s/step, from the model's
exact sizes, the run's workload and the calibrated coefficients (see ``choose`` for how a plan is chosen).

Pure Python (no torch). Activation terms are in bytes per unit, one unit being one token x one hidden channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sd3booth.plan.budget import host_stages, swap_host_bytes, t5_fp16_extra_gib
from sd3booth.plan.sizes import ModelSizes
from sd3booth.plan.terms import (
    ADAPTER_ACTIVATION_FACTOR,
    CLIP_LORA_PARAMS_PER_RANK,
    CLIP_UNITS_PER_TOKEN,
    CUDA_GRAPHS_EXTRA_GIB,
    CUDA_GRAPHS_POOL_FACTOR,
    CUDA_GRAPHS_TIME_FACTOR,
    OPTIMIZER_STATE_BYTES,
    SWAP_FP8_REASON,
    TEXT_ENCODER_MEASURED_EXTRA_GIB,
    shape_headroom_gib,
    shape_mode,
)

GIB = 2**30

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
    cuda_graphs: bool = False  # compiled blocks replayed as CUDA graphs (compile mode reduce-overhead)
    swap_dtype: str = "bf16"  # host copies of swapped blocks: "bf16" or "fp8" (e4m3 rows, upcast on the GPU)
    predicted: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> GiB
    predicted_s_per_step: float = field(default=0.0, compare=False)
    predicted_host: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> GiB of host RSS
    allocator_cap_gib: float = field(default=0.0, compare=False)  # the allocator's share of --max_vram (0: none)
    shapes: int = field(default=1, compare=False)  # batch shapes the run feeds (buckets x batch lengths)
    shape_headroom_gib: float = field(default=0.0, compare=False)  # kept free in training for them (terms.py)

    @property
    def peak(self) -> float:
        return max(self.predicted.values()) if self.predicted else 0.0

    @property
    def need(self) -> float:
        """What the allocator must have: the predicted peak, with the headroom several batch shapes need on top
        of the training stage's (fragments of differently sized activations, see terms.SHAPE_HEADROOM_BLOCKS)."""
        extra = {"training": self.shape_headroom_gib}
        return max((v + extra.get(k, 0.0) for k, v in self.predicted.items()), default=0.0)

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
            f"  blocks               {'compiled' if self.compiled else 'eager'}"
            + (", replayed as CUDA graphs" if self.cuda_graphs else ""),
            *self._shapes_line(),
            "  predicted peak GiB   " + ", ".join(f"{k} {v:.2f}" for k, v in self.predicted.items()),
            f"  GPU allocator cap    {self.allocator_cap_gib:.2f} GiB (the rest of the budget: CUDA context, "
            "workspaces, kernels)" if self.allocator_cap_gib else "  GPU allocator cap    none",
            "  predicted host GiB   " + ", ".join(f"{k} {v:.2f}" for k, v in self.predicted_host.items()),
            f"  predicted s/step     {self.predicted_s_per_step:.3f} (relative to the calibration GPU)",
        ]  # fmt: skip
        return "\n".join(lines)

    def _shapes_line(self) -> list[str]:
        if self.shapes <= 1:
            return []
        mode = shape_mode(self.shapes)
        how = f"{mode} shapes, " if self.compiled else ""
        how += "one compilation each" if self.compiled and mode == "static" else "fragments across sizes"
        return [
            f"  batch shapes         {self.shapes} ({how}): +{self.shape_headroom_gib:.2f} GiB kept free in training "
            "(estimate)"
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    shapes: int = 1  # distinct batch shapes (aspect-ratio buckets x batch lengths), counted from the data
    # the compiled blocks are in the persistent compile cache already (host RSS: no compile workers busy); the
    # planner assumes a first run (False), bench replays of measured runs say which they were
    compile_cached: bool = False

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
    block_act = units * full * ADAPTER_ACTIVATION_FACTOR[work.adapter]  # one block's, at the largest shape
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
    graphs = CUDA_GRAPHS_EXTRA_GIB if plan.cuda_graphs else 0.0
    stages["training"] = resident + lora + text + text_act + act + base_extra + graphs + c["fixed"]
    if work.validation:  # CUDA graphs keep the training activations in their pool through validation
        held = CUDA_GRAPHS_POOL_FACTOR * act + graphs if plan.cuda_graphs else 0.0
        stages["validation"] = resident + lora + text + held + max(sample_act, decode) + c["fixed"]
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
    if plan.cuda_graphs:
        seconds *= CUDA_GRAPHS_TIME_FACTOR
    host = host_stages(plan, sizes, work.t5_len, work.bf16, cal, work.on_gpu, work.compile_cached)
    return replace(
        plan,
        predicted={k_: round(v, 3) for k_, v in stages.items()},
        predicted_s_per_step=round(seconds, 4),
        predicted_host=host,
        shapes=work.shapes,
        shape_headroom_gib=round(shape_headroom_gib(work.shapes, block_act), 3),
    )
