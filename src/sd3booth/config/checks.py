"""Cheap consistency checks of the settings that need no file or model."""

from __future__ import annotations

import dataclasses

from sd3booth.config.settings import TrainConfig
from sd3booth.errors import UserError


def validate(cfg: TrainConfig) -> None:
    """Cheap consistency checks that need no file or model; each failure is one UserError line."""

    def bad(msg: str) -> None:
        raise UserError(msg)

    if not cfg.pretrained_model_name_or_path:
        bad("--pretrained_model_name_or_path is required: a local SD3 diffusers folder or a hub id")
    if bool(cfg.instance_data_dir) == bool(cfg.dataset_name):
        bad("give exactly one of --instance_data_dir and --dataset_name")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            bad(f"--{f.name} {value!r} is not one of {', '.join(choices)}")
    if cfg.use_8bit_adam and cfg.optimizer == "prodigy":
        bad("--use_8bit_adam conflicts with --optimizer prodigy; choose one optimizer")
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
    if cfg.with_prior_preservation:
        if not cfg.class_data_dir:
            bad("--with_prior_preservation needs --class_data_dir (a folder; missing class images are generated)")
        if not cfg.class_prompt:
            bad("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'")
        if cfg.num_class_images < 1:
            bad("--num_class_images must be at least 1")
