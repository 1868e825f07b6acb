"""Memory terms the planner adds for what a run trains and feeds: the training methods of issue #12 and several
batch shapes (issue #11's aspect-ratio buckets). Each constant names the measurement it comes from; pure Python.
"""

from __future__ import annotations

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
# --train_text_encoder: CLIP-L (12 layers x 768) and CLIP-G (32 x 1280) run with grad on 77 tokens; activations
# ~34 bytes per hidden unit per layer in 16-bit (Korthikanti et al. 2022, no recomputation)
CLIP_UNITS_PER_TOKEN = 12 * 768 + 32 * 1280
CLIP_LORA_PARAMS_PER_RANK = 4 * 2 * (12 * 768 + 32 * 1280)  # q/k/v/out, A and B
# what the terms above missed, measured (same run: 12.38 GiB against 10.68 predicted); the CLIP encoders are the
# same in every SD3 model, so it is a constant
TEXT_ENCODER_MEASURED_EXTRA_GIB = 1.70
# CUDA graphs (compile mode reduce-overhead), measured in one call on an H100 (SD3 Medium, 1024 px, batch 1,
# 2026-11-25): 0.0753 vs 0.1669 s/step; the graphs' pool keeps the step's activations between steps, so
# validation holds them too (reserved 11.98 vs 7.61 GiB allocated: 4.37 held, where the activations predict 3.75,
# hence the pool factor), and the graphs themselves take 0.18 GiB more in training.
CUDA_GRAPHS_TIME_FACTOR = 0.45
CUDA_GRAPHS_EXTRA_GIB = 0.18
CUDA_GRAPHS_POOL_FACTOR = 1.12
# DoRA reads the base weights when it is added, before the swapper takes the fp8 host copies the loader made
FP8_SWAP_UNSUPPORTED = ("dora",)
SWAP_FP8_REASON = (
    "fp8 (e4m3, a power-of-two scale per row, upcast on the GPU): the frozen base of the swapped blocks is "
    "quantised (about 3% RMS error per weight) to halve their host RAM and copy time; chosen only when "
    "bf16 copies do not fit --max_ram, or asked for with --swap_dtype fp8"
)

# ---- several batch shapes ---------------------------------------------------------------------------------

# Up to this many batch shapes (aspect-ratio buckets x batch lengths) compiled blocks compile once each, with
# static shapes; more switch to dynamic shapes (models.speed.dynamic_shapes; BENCHMARKS.md, issue #11 section:
# static shapes 0.90x the square run's s/step, dynamic 1.12x).
MAX_STATIC_SHAPES = 8
# Headroom the caching allocator needs in the training stage for each batch shape beyond the first, in units of
# one transformer block's full activations at the largest shape (what a block's forward or recompute allocates
# and frees again). Shapes alternate step by step: blocks freed by one shape's activations are split for
# another's, and the pieces that a tensor living across steps lands in cannot be given back when the allocator
# reaches its cap.
# Derived from the one run that showed it (H100, SD3 Medium, 1024 px, 4 bucket shapes, compiled static blocks,
# 24 checkpointed, 18 swapped, --max_vram 3; tools/gpu_buckets.sh, 2026-11-25,
# bench/results/2026-11-25-h100-sd3m-buckets-capped-runs.json): out of memory after step 1 with 2.04 GiB
# allocated under a 2.19 GiB allocator cap (2.06 predicted), so at least 0.15 GiB of the cap could not be used:
# one block's full activations at that size (0.150 GiB: 4250 tokens x 1536 x 24.7 bytes, compiled) for 3 extra
# shapes, hence 1/3 of a block per extra shape. The same run lacked expandable segments (the tool started CUDA
# before the CLI set PYTORCH_CUDA_ALLOC_CONF; fixed), which cut this kind of fragmentation, and the failing
# request's size is unknown: AN ESTIMATE FROM ONE FAILURE UNTIL RE-MEASURED (BENCHMARKS.md gives the command).
# Counted up to MAX_STATIC_SHAPES shapes: not measured beyond 4, and dynamic shapes see as many sizes.
SHAPE_HEADROOM_BLOCKS = 1 / 3


def shape_mode(shapes: int) -> str:
    """How compiled blocks meet ``shapes`` batch shapes by default: "static" (one compilation per shape, each at
    full speed) up to MAX_STATIC_SHAPES, else "dynamic" (one compilation for all)."""
    return "dynamic" if shapes > MAX_STATIC_SHAPES else "static"


def shape_headroom_gib(shapes: int, block_activation_gib: float) -> float:
    """GiB the allocator must keep free in the training stage when ``shapes`` batch shapes alternate
    (0 for one shape); ``block_activation_gib`` is one block's full activations at the largest shape."""
    extra = min(max(shapes, 1), MAX_STATIC_SHAPES) - 1
    return SHAPE_HEADROOM_BLOCKS * extra * block_activation_gib
