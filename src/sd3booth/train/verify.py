"""Every check of the settings and inputs that needs no model weights: fails in seconds, writes nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sd3booth.adapters import init_lora, lora
from sd3booth.config import TrainConfig
from sd3booth.errors import UserError
from sd3booth.models import source
from sd3booth.prepare import new_run, scan_data, validation_prompts
from sd3booth.train import checkpoint, preflight
from sd3booth.train.publish import offline_message
from sd3booth.train.settings import SETTINGS_FILE


def _writable_folder(path: Path, flag: str) -> None:
    """The folder may not exist yet, but nothing on its way may be a file."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {path}: {p} is a file, not a folder; choose another path")
            return


def verify(cfg: TrainConfig) -> None:
    """Raises UserError for any mistake found before models load; runs before anything is created or changed,
    so a mistake costs seconds and no saved file."""
    new_run()
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    if not (src.root / "text_encoder_3").is_dir() and cfg.t5_precision != "none":
        raise UserError(
            f"{cfg.pretrained_model_name_or_path} has no T5-XXL encoder: pass --t5xxl FILE (fp16, bf16 or fp8 e4m3, "
            "e.g. t5xxl_fp8_e4m3fn.safetensors) or --t5_precision none"
        )
    if cfg.instance_data_dir and not Path(cfg.instance_data_dir).is_dir():
        raise UserError(f"--instance_data_dir {cfg.instance_data_dir} is not a folder; pass the folder of your photos")
    out = Path(cfg.output_dir)
    _writable_folder(out, "--output_dir")
    _writable_folder(cfg.cache_path, "--cache_dir")
    if cfg.class_images:
        _writable_folder(Path(cfg.class_data_dir or ""), "--class_data_dir")
    if cfg.report_to in ("tensorboard", "wandb") and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(
            f"--report_to {cfg.report_to} needs the '{cfg.report_to}' package; pip install "
            f"{cfg.report_to}, or pass --report_to none (metrics.jsonl is always written)"
        )
    settings = out / SETTINGS_FILE
    if settings.is_file() and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} holds another run ({SETTINGS_FILE}); continue it with --resume_from_checkpoint "
            "latest, replace it with --overwrite_output_dir (the cache is kept), or choose another folder"
        )
    if cfg.resume_from_checkpoint:
        checkpoint.find(out / "checkpoints", cfg.resume_from_checkpoint)
    if cfg.adapter_type != "lora" and (cfg.lora_format != "diffusers" or cfg.init_lora):
        flag = f"--lora_format {cfg.lora_format}" if cfg.lora_format != "diffusers" else "--init_lora"
        raise UserError(
            f"{flag} goes with --lora_type lora; a {cfg.adapter_type} adapter is saved in its own layout "
            "(see --lora_type in --help)"
        )
    if cfg.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # fail now, not after training (the upload itself is in train.publish)
            raise UserError(offline_message(out))
    if cfg.dataset_config or Path(cfg.data_dir or "").is_dir():
        scan_data(cfg, log=lambda m: None)  # data errors now, not after the text encoders ran
    validation_prompts(cfg)
    # LoRA targets against the architecture, built on the meta device (no memory, no weights)
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        skeleton = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(src.root / "transformer"))
    if cfg.init_lora:
        if cfg.lora_blocks and not cfg.lora_layers:
            raise UserError(
                "--lora_blocks with --init_lora needs --lora_layers too (the file's layers are named in full)"
            )
        modules = init_lora.read_init(cfg.init_lora)
        init_lora.check_fits(skeleton, modules, cfg.target_layers if cfg.lora_layers else None, cfg.init_lora)
    if cfg.lora_layers or not cfg.init_lora:  # without --lora_layers an --init_lora run trains the file's layers
        lora.resolve_targets(skeleton, cfg.target_layers, cfg.target_blocks)
    preflight.check(cfg, src)  # writable folders, packages, resolution, a strict resume (train/preflight.py)
