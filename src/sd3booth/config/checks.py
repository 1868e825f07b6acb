"""Cheap consistency checks of the settings that need no file or model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sd3booth.config.settings import TrainConfig
from sd3booth.errors import UserError


def validate(cfg: TrainConfig) -> None:
    """Cheap consistency checks that need no file or model; each failure is one UserError line."""

    def bad(msg: str) -> None:
        raise UserError(msg)

    if not cfg.pretrained_model_name_or_path:
        bad("--pretrained_model_name_or_path is required: a local SD3 diffusers folder or a hub id")
    if sum(map(bool, (cfg.instance_data_dir, cfg.dataset_name, cfg.dataset_config))) != 1:
        bad("give exactly one of --instance_data_dir and --dataset_name (or --dataset_config for several folders)")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            bad(f"--{f.name} {value!r} is not one of {', '.join(choices)}")
    if cfg.resolution < 16 or cfg.resolution % 16:
        bad(f"--resolution {cfg.resolution} must be a positive multiple of 16 (VAE factor 8 x patch size 2)")
    positive = (
        "train_batch_size",
        "gradient_accumulation_steps",
        "rank",
        "repeats",
        "num_train_epochs",
        "checkpointing_steps",
        "num_inference_steps",
        "sample_batch_size",
        "logging_steps",
        "max_bad_steps",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            bad(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        bad(f"--max_train_steps must be at least 1, got {cfg.max_train_steps}")
    if not 1 <= cfg.max_sequence_length <= 512:
        bad(f"--max_sequence_length must be between 1 and 512, got {cfg.max_sequence_length}")
    if cfg.learning_rate <= 0:
        bad(f"--learning_rate must be positive, got {cfg.learning_rate}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        bad(f"--lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        bad("--checkpoints_total_limit must be at least 1")
    if cfg.num_cpu_threads is not None and cfg.num_cpu_threads < 1:
        bad(f"--num_cpu_threads must be at least 1, got {cfg.num_cpu_threads}")
    _check_memory(cfg, bad)
    for name in ("lr_warmup_steps", "max_grad_norm", "prior_loss_weight", "adam_weight_decay"):
        if getattr(cfg, name) < 0:
            bad(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.validation_steps is not None and cfg.validation_steps < 1:
        bad("--validation_steps must be at least 1")
    if cfg.validation_epochs < 1:
        bad("--validation_epochs must be at least 1")
    if cfg.num_validation_images < 1:
        bad("--num_validation_images must be at least 1")
    if cfg.precondition_outputs not in (0, 1):
        bad("--precondition_outputs must be 0 or 1")
    if cfg.lora_blocks:
        try:
            blocks = cfg.target_blocks or []
        except ValueError:
            bad(f"--lora_blocks {cfg.lora_blocks!r} must be comma-separated block numbers, e.g. '0,1,12'")
        if any(b < 0 for b in blocks):
            bad("--lora_blocks must be non-negative block numbers")
    _check_data(cfg, bad)
    _check_methods(cfg, bad)
    if cfg.class_images and not cfg.dataset_config:  # a dataset config names class folders per entry
        if not cfg.class_data_dir:
            bad("--with_prior_preservation needs --class_data_dir (a folder; missing class images are generated)")
        if not cfg.class_prompt:
            bad("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'")
        if cfg.num_class_images < 1:
            bad("--num_class_images must be at least 1")


def _check_data(cfg: TrainConfig, bad: Callable[[str], None]) -> None:
    """Buckets, masks, caption dropout, validation size."""
    step = cfg.bucket_reso_steps
    if step < 16 or step % 16:
        bad(f"--bucket_reso_steps {step} must be a positive multiple of 16 (VAE factor 8 x patch size 2)")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(cfg, name)
        if value is not None and (value < step or value % step):
            bad(f"--{name} {value} must be a positive multiple of --bucket_reso_steps {step}")
    if cfg.min_bucket_reso and cfg.max_bucket_reso and cfg.min_bucket_reso > cfg.max_bucket_reso:
        bad(f"--min_bucket_reso {cfg.min_bucket_reso} is above --max_bucket_reso {cfg.max_bucket_reso}")
    if cfg.enable_bucket and cfg.resolution < step:
        bad(f"--resolution {cfg.resolution} is below --bucket_reso_steps {step}; lower the step for buckets")
    if cfg.masked_loss and not (cfg.mask_dir or cfg.alpha_mask or cfg.dataset_config):
        bad("--masked_loss needs masks: --mask_dir FOLDER (white = train) or --alpha_mask (the images' alpha)")
    if (cfg.mask_dir or cfg.alpha_mask) and not cfg.masked_loss:
        bad(f"{'--mask_dir' if cfg.mask_dir else '--alpha_mask'} is used only with --masked_loss; add it")
    if cfg.mask_dir and cfg.alpha_mask:
        bad("--mask_dir and --alpha_mask both give masks; choose one")
    if not 0.0 <= cfg.caption_dropout_rate <= 1.0:
        bad(f"--caption_dropout_rate must be between 0 and 1, got {cfg.caption_dropout_rate}")
    for name in ("width", "height"):
        value = getattr(cfg, name)
        if value is not None and (value < 16 or value % 16):
            bad(f"--{name} {value} must be a positive multiple of 16")


def _check_memory(cfg: TrainConfig, bad: Callable[[str], None]) -> None:
    """The memory budgets and the memory settings that fix part of the plan."""
    if cfg.max_vram is not None and cfg.max_vram <= 0:
        bad(f"--max_vram must be positive GiB, got {cfg.max_vram}")
    if cfg.max_ram is not None and cfg.max_ram <= 0:
        bad(f"--max_ram must be positive GiB, got {cfg.max_ram}")
    if cfg.blocks_to_swap is not None and cfg.blocks_to_swap < 0:
        bad("--blocks_to_swap must be 0 or more")
    if cfg.checkpoint_blocks is not None and cfg.checkpoint_blocks < 0:
        bad("--checkpoint_blocks must be 0 or more")
    if cfg.base_precision == "nf4" and cfg.blocks_to_swap:
        bad("--blocks_to_swap cannot move NF4 weights; use --base_precision bf16 or fp8 with block swap")
    if cfg.swap_dtype == "fp8" and cfg.base_precision in ("fp8", "nf4"):
        bad(f"--swap_dtype fp8 quantises a bf16 base's swapped blocks; --base_precision {cfg.base_precision} "
            "already stores them quantised (leave --swap_dtype unset)")  # fmt: skip
    if cfg.swap_dtype == "fp8" and cfg.blocks_to_swap == 0:
        bad("--swap_dtype fp8 applies to swapped blocks, and --blocks_to_swap is 0")


def _check_methods(cfg: TrainConfig, bad: Callable[[str], None]) -> None:
    """Adapter, optimizer, EMA, loss and prior-mode combinations (issue #12)."""
    if cfg.use_dora and cfg.lora_type not in ("lora", "dora"):
        bad(f"--use_dora conflicts with --lora_type {cfg.lora_type}; DoRA is a LoRA variant: pass --lora_type dora")
    kind = cfg.adapter_type
    if kind in ("loha", "lokr") and cfg.lora_dropout:
        bad(f"--lora_dropout applies to lora and dora only; --lora_type {kind} has no input dropout")
    if cfg.lokr_factor != -1 and kind != "lokr":
        bad(f"--lokr_factor applies to --lora_type lokr only (now {kind})")
    if cfg.lokr_factor == 0 or cfg.lokr_factor < -1:
        bad(f"--lokr_factor must be -1 (automatic) or a positive factor, got {cfg.lokr_factor}")
    if kind == "dora" and cfg.base_precision == "fp8":
        bad("--lora_type dora reads the base weights, which fp8 storage hides; use --base_precision bf16 or nf4")
    if cfg.base_compute == "fp8" and (kind != "lora" or cfg.base_precision not in ("auto", "bf16")):
        bad("--base_compute fp8 quantises bf16 base weights under a plain LoRA; use --lora_type lora and "
            "--base_precision bf16 (or auto) with it")  # fmt: skip
    if cfg.base_compute == "fp8" and cfg.blocks_to_swap:
        bad("--base_compute fp8 keeps every block on the GPU; drop --blocks_to_swap or use --base_compute bf16")
    if kind == "dora" and cfg.swap_dtype == "fp8":
        bad("--lora_type dora reads the base weights when it is added, before the fp8 swap copies exist; use bf16")
    if kind in ("loha", "lokr") and cfg.base_precision == "nf4":
        bad(f"--lora_type {kind} needs unquantised base weights; use --base_precision bf16 or fp8")
    # --text_encoder_lr alone is accepted as the diffusers script accepts it (config.compat notes it)
    if not cfg.train_text_encoder and cfg.text_encoder_rank is not None:
        bad("--text_encoder_rank needs --train_text_encoder")
    if cfg.text_encoder_rank is not None and cfg.text_encoder_rank < 1:
        bad(f"--text_encoder_rank must be at least 1, got {cfg.text_encoder_rank}")
    if cfg.text_encoder_lr is not None and cfg.text_encoder_lr <= 0:
        bad(f"--text_encoder_lr must be positive, got {cfg.text_encoder_lr}")
    if cfg.optimizer == "prodigy" and cfg.text_encoder_lr not in (None, cfg.learning_rate):
        bad("--optimizer prodigy adapts one learning rate for every parameter; drop --text_encoder_lr")
    if cfg.use_8bit_adam and cfg.optimizer != "adamw":
        bad(f"--use_8bit_adam conflicts with --optimizer {cfg.optimizer}; choose one optimizer")
    if cfg.optimizer == "adamw_schedulefree":
        if cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
            bad(
                f"--optimizer adamw_schedulefree replaces the schedule; --lr_scheduler {cfg.lr_scheduler} must be "
                "constant (or constant_with_warmup for its warm-up)"
            )
        if cfg.use_ema:
            bad("--use_ema with --optimizer adamw_schedulefree: schedule-free already averages the weights")
    if cfg.adafactor_relative_step and cfg.optimizer != "adafactor":
        bad("--adafactor_relative_step applies to --optimizer adafactor only")
    if not 0.0 < cfg.ema_decay < 1.0:
        bad(f"--ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.loss_type != "l2" and cfg.huber_c <= 0:
        bad(f"--huber_c must be positive, got {cfg.huber_c}")
    if cfg.prior_preservation_mode == "base_model" and not cfg.with_prior_preservation:
        bad("--prior_preservation_mode base_model needs --with_prior_preservation (it sets how the prior is kept)")
    if cfg.base_model_prior:
        if not cfg.class_prompt:
            bad("--prior_preservation_mode base_model needs --class_prompt, e.g. 'a photo of a dog'")
        if cfg.class_data_dir:
            bad("--prior_preservation_mode base_model uses no class images; drop --class_data_dir")
