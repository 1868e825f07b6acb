"""Typed settings for a training run: defaults < config file (TOML or JSON) < command-line flags.

No torch here: this module must import in milliseconds so that bad settings fail before anything heavy
loads (litgpt's "verify settings first"). Flag names follow diffusers' ``train_dreambooth_lora_sd3.py``
wherever the meaning is the same, so users of that script can switch by changing the command name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sd3booth.config.interop import GENERATION_PRECISIONS, HELP, LORA_FORMATS, SAVE_PRECISIONS
from sd3booth.config.views import DEFAULT_LORA_LAYERS, SettingsViews

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "prodigy",
    "lion",
    "lion8bit",
    "adafactor",
    "adamw_schedulefree",
    "stableadamw",
)
LORA_TYPES = ("lora", "dora", "loha", "lokr")
EMA_DEVICES = ("cpu", "gpu")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
PRIOR_MODES = ("class_images", "base_model")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
T5_PRECISIONS = ("auto", "bf16", "int8", "nf4", "stream", "cpu", "none")
BASE_PRECISIONS = ("auto", "bf16", "fp8", "nf4")
BASE_COMPUTES = ("bf16", "fp8")
SWAP_DTYPES = ("auto", "bf16", "fp8")
REPORTERS = ("tensorboard", "wandb", "none")


def _f(default: Any, help: str, *, choices: tuple[str, ...] | None = None, group: str = "training") -> Any:
    meta = {"help": help, "group": group}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig(SettingsViews):
    """Every setting of ``sd3booth train`` / ``prepare``. Field names are the flag names."""

    # model
    pretrained_model_name_or_path: str | None = _f(
        None,
        "Base model: a local diffusers SD3 folder, a Hugging Face hub id, or a single .safetensors file (SD3 Medium, "
        "SD3.5 Medium/Large; with or without bundled encoders, see --clip_l/--clip_g/--t5xxl).",
        group="model",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.", group="model")
    variant: str | None = _f(None, "Weight file variant of the base model, e.g. 'fp16'.", group="model")
    t5_precision: str = _f(
        "auto",
        "How T5-XXL runs while captions are encoded: bf16 on the GPU, int8 or nf4 (bitsandbytes, GPU), stream "
        "(bf16 weights on the CPU, streamed to the GPU layer by layer), cpu (bf16 on the CPU, no GPU memory), or "
        "none (T5 skipped, zeros as the pipeline does without it); auto lets the memory plan choose.",
        choices=T5_PRECISIONS,
        group="model",
    )
    max_sequence_length: int = _f(
        77, "T5 tokens per caption (the reference trains with 77; the pipeline uses 256).", group="model"
    )
    clip_l: str | None = _f(None, HELP["clip_l"], group="model")
    clip_g: str | None = _f(None, HELP["clip_g"], group="model")
    t5xxl: str | None = _f(None, HELP["t5xxl"], group="model")
    single_file_config: str | None = _f(None, HELP["single_file_config"], group="model")
    init_lora: str | None = _f(None, HELP["init_lora"], group="model")
    # memory
    max_vram: float | None = _f(
        None,
        "GPU memory in GiB this run may use, counted as nvidia-smi counts it (the whole process: CUDA context, "
        "library workspaces and compiled kernels included); the fastest settings predicted to fit are chosen and "
        "printed before any model loads, and the allocator is capped to its share (default: the card's free "
        "memory at start, less 0.5 GiB).",
        group="memory",
    )
    max_ram: float | None = _f(
        None,
        "Host memory (RAM) in GiB this run may use, as its resident set: T5 kept in host memory, pinned copies of "
        "swapped blocks and loading all count; plans that need more are not chosen (default: the memory "
        "available at start, less 1 GiB).",
        group="memory",
    )
    base_precision: str = _f(
        "auto",
        "Storage of the frozen transformer: bf16, fp8 (compute in bf16; needs checkpointing) or nf4 "
        "(bitsandbytes); auto lets the memory plan choose.",
        choices=BASE_PRECISIONS,
        group="memory",
    )
    blocks_to_swap: int | None = _f(
        None,
        "Transformer blocks whose frozen weights live in pinned CPU memory and are streamed in ahead of use "
        "(default: the memory plan's choice).",
        group="memory",
    )
    swap_dtype: str = _f(
        "auto",
        "Host copies of swapped blocks' frozen weights: bf16 (exact), or fp8 (e4m3 with a power-of-two scale per "
        "row, upcast on the GPU after the copy: half the host RAM and PCIe traffic, but the frozen base of those "
        "blocks is quantised); auto takes fp8 only when bf16 copies do not fit --max_ram.",
        choices=SWAP_DTYPES,
        group="memory",
    )
    checkpoint_blocks: int | None = _f(
        None,
        "Blocks whose activations are recomputed in backward (default: the memory plan's choice; "
        "--gradient_checkpointing means all).",
        group="memory",
    )
    activation_offload: bool | None = _f(
        None, "Keep saved activations in pinned CPU memory during the backward pass (default: plan).", group="memory"
    )
    vae_tiling: bool | None = _f(None, "Encode and decode images in tiles (default: plan).", group="memory")
    # speed
    compile: bool | None = _f(
        None,
        "Compile each transformer block with torch.compile (the first run's first steps pay ~30 s of compilation, "
        "kept for later runs in ~/.cache/sd3booth/compile or $SD3BOOTH_COMPILE_CACHE; "
        "default: on for a CUDA GPU with bf16 weights, off on CPU, NF4/fp8 bases and activation offload).",
        group="speed",
    )
    base_compute: str = _f(
        "bf16",
        "Arithmetic of the frozen transformer's big matmuls: bf16, or fp8 (e4m3 with row-wise scales, forward and "
        "input gradient; the LoRA path stays bf16/fp32). fp8 needs an Ada, Hopper or newer GPU, a plain LoRA "
        "(--lora_type lora) and no block swap; it changes the base model's numerics (BENCHMARKS.md gives the "
        "measured error and speed). On the CPU it runs a slow reference path meant for tests.",
        choices=BASE_COMPUTES,
        group="speed",
    )
    cuda_graphs: bool | None = _f(
        None,
        "Replay each compiled block as a CUDA graph (torch.compile mode reduce-overhead): no kernel launches on "
        "the CPU's clock, 2.2x faster steps measured on an H100 at batch 1; graphs hold their activations between "
        "steps, so validation needs that much more memory. Default: on where the plan keeps every block resident "
        "and uncheckpointed and the memory fits (no block swap, checkpointing or activation offload).",
        group="speed",
    )
    attention_backend: str = _f(
        "auto",
        "Attention kernel (auto: cuDNN first on Hopper and newer, flash first on older GPUs).",
        choices=ATTENTION_BACKENDS,
        group="speed",
    )
    num_cpu_threads: int | None = _f(
        None,
        "CPU threads for torch (default on a CPU-only run: the physical cores this process may use, less those "
        "other processes keep busy, at most 8; GPU runs keep torch's default).",
        group="speed",
    )
    # data
    instance_data_dir: str | None = _f(
        None,
        "Folder of instance images; captions from metadata.jsonl, same-name .txt files, or --instance_prompt.",
        group="data",
    )
    dataset_name: str | None = _f(
        None,
        "A local folder in imagefolder layout, or a hub dataset (needs the 'datasets' package and a network).",
        group="data",
    )
    caption_column: str = _f("caption", "Caption key in metadata.jsonl (or column of --dataset_name).", group="data")
    image_column: str | None = _f(
        None,
        "Image key in metadata.jsonl (default 'file_name'), or image column of a hub dataset (default 'image').",
        group="data",
    )
    instance_prompt: str | None = _f(
        None, "Caption for every image that has none, e.g. 'a photo of sks dog'.", group="data"
    )
    resolution: int = _f(512, "Training resolution in pixels (square; a multiple of 16).", group="data")
    center_crop: bool = _f(
        False, "Center-crop images; otherwise crop randomly each step (in latent space).", group="data"
    )
    random_flip: bool = _f(False, "Flip images horizontally at random each step (both flips are cached).", group="data")
    repeats: int = _f(1, "How many times each instance image appears per epoch.", group="data")
    cache_dir: str | None = _f(
        None,
        "Where text embeddings and latents are cached (default OUTPUT_DIR/cache). Keys are content hashes, "
        "so one cache can serve many runs.",
        group="data",
    )
    enable_bucket: bool | None = _f(
        None,
        "Aspect-ratio buckets of about --resolution^2 pixels: each image goes to the nearest, loses at most "
        "--bucket_reso_steps to cropping, and a batch holds one bucket (default: on unless every image fits the "
        "square; --no-enable_bucket crops square).",
        group="data",
    )
    min_bucket_reso: int | None = _f(None, "Shortest bucket side in pixels (default: --resolution / 2).", group="data")
    max_bucket_reso: int | None = _f(None, "Longest bucket side in pixels (default: --resolution * 2).", group="data")
    bucket_reso_steps: int = _f(64, "Bucket sides are multiples of this many pixels (a multiple of 16).", group="data")
    masked_loss: bool = _f(
        False,
        "Weight the loss by a mask (white = train), normalised by its area; see --mask_dir, --alpha_mask.",
        group="data",
    )
    mask_dir: str | None = _f(None, "Masks for --masked_loss: each image's relative path, any format.", group="data")
    alpha_mask: bool = _f(False, "With --masked_loss, use each image's own alpha channel as its mask.", group="data")
    caption_dropout_rate: float = _f(
        0.0, "Fraction of instance captions replaced by the empty prompt each step (fixed by --seed).", group="data"
    )
    dataset_config: str | None = _f(
        None,
        "TOML file of [[datasets]] entries, one per concept (instance_data_dir, instance_prompt, repeats, resolution, "
        "class_data_dir, class_prompt, num_class_images, prior_loss_weight, mask_dir); the flags fill in the rest.",
        group="data",
    )
    # prior preservation
    with_prior_preservation: bool = _f(
        False, "Add the DreamBooth prior-preservation loss on class images.", group="prior"
    )
    class_data_dir: str | None = _f(
        None, "Folder of class images; missing ones are generated and kept there.", group="prior"
    )
    class_prompt: str | None = _f(None, "Prompt of the class, e.g. 'a photo of a dog'.", group="prior")
    num_class_images: int = _f(
        100, "Class images wanted; the shortfall is generated with the base model.", group="prior"
    )
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.", group="prior")
    sample_batch_size: int = _f(4, "Batch size when generating class images.", group="prior")
    prior_preservation_mode: str = _f(
        "class_images",
        "class_images: the classic DreamBooth prior on --class_data_dir images (missing ones generated); "
        "base_model: the class prompt on the same noisy latents, regressed onto the base model's own prediction "
        "(adapter off, no gradient) as SimpleTuner and OneTrainer do; no class images at all, one extra "
        "forward pass per step.",
        choices=PRIOR_MODES,
        group="prior",
    )
    # LoRA
    rank: int = _f(4, "LoRA rank.", group="lora")
    lora_alpha: int | None = _f(
        None,
        "LoRA alpha (default: rank). Baked into the saved file, which loads with alpha = rank everywhere.",
        group="lora",
    )
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", group="lora")
    lora_layers: str | None = _f(
        None,
        "Comma-separated module names to train, e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' "
        f"(default: {','.join(DEFAULT_LORA_LAYERS)}).",
        group="lora",
    )
    lora_blocks: str | None = _f(
        None, "Comma-separated transformer block indices to train, e.g. '12,13' (default: all blocks).", group="lora"
    )
    lora_type: str = _f(
        "lora",
        "Adapter: lora; dora (weight-decomposed LoRA: a learnt magnitude per output row, ~1.3x the step time); "
        "loha (Hadamard product of two rank-r LoRAs: updates of rank up to r², for twice the parameters); lokr "
        "(Kronecker product, far fewer parameters, --lokr_factor). --rank and --lora_alpha are the linear dims "
        "of every type (SD3's targets are all Linear layers, so no conv dims apply).",
        choices=LORA_TYPES,
        group="lora",
    )
    use_dora: bool = _f(False, "Same as --lora_type dora (peft's and the diffusers scripts' name).", group="lora")
    lokr_factor: int = _f(
        -1,
        "LoKr: size of the small Kronecker factor of each dimension (e.g. 16, SimpleTuner's SD3 choice); "
        "-1 splits each dimension near its square root (LyCORIS' default).",
        group="lora",
    )
    train_text_encoder: bool = _f(
        False,
        "Also train a LoRA on CLIP-L and CLIP-G (q/k/v/out projections, as the diffusers script); T5 stays frozen "
        "and cached. The CLIP encoders then stay on the GPU and run every step from cached token ids.",
        group="lora",
    )
    text_encoder_lr: float | None = _f(
        None, "Learning rate of the text-encoder LoRA (default: --learning_rate).", group="lora"
    )
    text_encoder_rank: int | None = _f(None, "Rank of the text-encoder LoRA (default: --rank).", group="lora")
    # optimisation
    train_batch_size: int = _f(4, "Instance images per step and process (prior preservation adds as many).")
    num_train_epochs: int = _f(1, "Epochs to train; ignored when --max_train_steps is set.")
    max_train_steps: int | None = _f(None, "Total optimizer steps; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, slower.")
    learning_rate: float = _f(1e-4, "Initial learning rate (after warm-up). Prodigy wants about 1.0.")
    scale_lr: bool = _f(False, "Multiply the learning rate by accumulation steps, batch size and processes.")
    lr_scheduler: str = _f("constant", "Learning-rate schedule (diffusers.optimization).", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(500, "Warm-up steps of the schedule.")
    lr_num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables).")
    max_bad_steps: int = _f(
        20,
        "fp16 runs: stop (with one line, the last checkpoint intact) after this many steps in a row skipped for "
        "gradient overflow; a non-finite loss in bf16/fp32 stops at once.",
    )
    optimizer: str = _f("adamw", "adamw, adamw8bit (bitsandbytes) or prodigy.", choices=OPTIMIZERS)
    use_8bit_adam: bool = _f(False, "Same as --optimizer adamw8bit (kept for the diffusers script's users).")
    adam_beta1: float = _f(0.9, "Beta1 of Adam and Prodigy.")
    adam_beta2: float = _f(0.999, "Beta2 of Adam and Prodigy.")
    prodigy_beta3: float | None = _f(None, "Prodigy beta3 (default: sqrt(beta2)).")
    prodigy_decouple: bool = _f(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy: remove the learning rate from the denominator in warm-up.")
    adam_weight_decay: float = _f(1e-4, "Weight decay of the LoRA parameters.")
    adam_epsilon: float = _f(1e-8, "Epsilon of Adam and Prodigy.")
    lion_beta1: float = _f(0.9, "Beta1 of Lion (lion, lion8bit).")
    lion_beta2: float = _f(0.99, "Beta2 of Lion (the Lion paper's default; Adam's 0.999 is too slow for it).")
    adafactor_relative_step: bool = _f(
        False, "Adafactor: its own relative step size instead of --learning_rate (needs --learning_rate 1)."
    )
    adafactor_scale_parameter: bool = _f(False, "Adafactor: scale the step by the parameter's RMS.")
    adafactor_warmup_init: bool = _f(False, "Adafactor: warm-up of the relative step (with --adafactor_relative_step).")
    adafactor_clip_threshold: float = _f(1.0, "Adafactor: clip the update's RMS to this.")
    adafactor_decay_rate: float = _f(-0.8, "Adafactor: exponent of the second-moment decay.")
    schedulefree_r: float = _f(0.0, "adamw_schedulefree: polynomial weighting power r of the averaged iterates.")
    schedulefree_weight_lr_power: float = _f(2.0, "adamw_schedulefree: weight of each iterate ~ lr^this.")
    use_ema: bool = _f(
        False,
        "Keep an exponential moving average of the adapter weights; validation images and the saved LoRA use it, "
        "the raw weights are saved beside (pytorch_lora_weights_raw.safetensors).",
    )
    ema_decay: float = _f(
        0.995,
        "EMA decay; the first steps use min(decay, (1 + step) / (10 + step)) as diffusers' EMAModel does, so "
        "the zero-initialised start does not linger.",
    )
    ema_device: str = _f(
        "gpu", "Where the EMA copy lives: gpu (fast), or cpu (no GPU memory; one copy to the host per step).",
        choices=EMA_DEVICES,
    )  # fmt: skip
    loss_type: str = _f(
        "l2",
        "l2 (the reference); huber or smooth_l1 (kohya's pseudo-Huber forms, less pulled by outliers; "
        "--huber_c sets where they turn from quadratic to linear).",
        choices=LOSS_TYPES,
    )
    huber_c: float = _f(0.1, "Transition point of --loss_type huber and smooth_l1 (kohya's default 0.1).")
    mixed_precision: str | None = _f(
        None,
        "no, fp16 or bf16 (default: bf16 on a GPU that has it, fp16 on one that has not, no on CPU). "
        "LoRA weights and optimizer state stay fp32; fp16 uses a gradient scaler.",
        choices=MIXED_PRECISIONS,
    )
    allow_tf32: bool = _f(False, "Allow TF32 matrix products on Ampere and newer GPUs.")
    seed: int | None = _f(None, "Random seed; the same seed gives bit-identical LoRA weights on CPU.")
    # flow matching
    weighting_scheme: str = _f(
        "logit_normal", "Timestep density and loss weighting (SD3 paper).", choices=WEIGHTING_SCHEMES, group="flow"
    )
    logit_mean: float = _f(0.0, "Mean of the logit_normal timestep density.", group="flow")
    logit_std: float = _f(1.0, "Std of the logit_normal timestep density.", group="flow")
    mode_scale: float = _f(1.29, "Scale of the 'mode' timestep density.", group="flow")
    precondition_outputs: int = _f(
        1, "1: loss on the denoised latent (reference default); 0: on the velocity.", group="flow"
    )
    # validation
    validation_prompt: list[str] | None = _f(
        None, "Prompt for validation images during training; repeat the flag for several.", group="validation"
    )
    num_validation_images: int = _f(4, "Validation images per validation.", group="validation")
    validation_epochs: int = _f(50, "Validate every N epochs (when --validation_steps is not set).", group="validation")
    validation_steps: int | None = _f(None, "Validate every N optimizer steps.", group="validation")
    num_inference_steps: int = _f(28, "Sampling steps for validation and class images.", group="validation")
    guidance_scale: float = _f(7.0, "Classifier-free guidance for validation and class images.", group="validation")
    validation_prompt_file: str | None = _f(None, "Text file of validation prompts, one per line.", group="validation")
    width: int | None = _f(None, "Width of validation images (default: --resolution).", group="validation")
    height: int | None = _f(None, "Height of validation images (default: --resolution).", group="validation")
    # checkpoints and output
    output_dir: str = _f("sd3-dreambooth-lora", "Where the LoRA, checkpoints, images and logs go.", group="output")
    overwrite_output_dir: bool = _f(
        False, "Allow writing into an output folder that holds another run (its cache is kept).", group="output"
    )
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.", group="output")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints.", group="output")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to continue from.", group="output")
    report_to: str = _f("tensorboard", "Where metrics go besides metrics.jsonl.", choices=REPORTERS, group="output")
    logging_dir: str = _f("logs", "TensorBoard folder, relative to OUTPUT_DIR.", group="output")
    logging_steps: int = _f(
        10, "Log loss, lr, s/step and peak memory every N steps (each log waits for the GPU).", group="output"
    )
    lora_format: str = _f("diffusers", HELP["lora_format"], choices=LORA_FORMATS, group="output")
    save_precision: str = _f("bf16", HELP["save_precision"], choices=SAVE_PRECISIONS, group="output")
    push_to_hub: bool = _f(False, HELP["push_to_hub"], group="output")
    hub_model_id: str | None = _f(None, HELP["hub_model_id"], group="output")
    hub_token: str | None = _f(None, HELP["hub_token"], group="output")

    # diffusers-script compatibility: flags of train_dreambooth_lora_sd3.py (config.compat notes the no-ops)
    dataset_config_name: str | None = _f(None, HELP["dataset_config_name"], group="compat")
    upcast_before_saving: bool = _f(False, HELP["upcast_before_saving"], group="compat")
    cache_latents: bool = _f(False, HELP["cache_latents"], group="compat")
    dataloader_num_workers: int = _f(0, HELP["dataloader_num_workers"], group="compat")
    local_rank: int = _f(-1, HELP["local_rank"], group="compat")
    prior_generation_precision: str | None = _f(
        None, HELP["prior_generation_precision"], choices=GENERATION_PRECISIONS, group="compat"
    )
    adam_weight_decay_text_encoder: float = _f(1e-3, HELP["adam_weight_decay_text_encoder"], group="compat")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
