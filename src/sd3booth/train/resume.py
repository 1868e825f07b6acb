"""What a resumed run must keep, and what it may change.

A checkpoint is the state of one training run: LoRA weights of a given shape on given layers, optimizer
moments of a given optimizer, a data order of a given dataset, batch and seed. Continuing it with any of
those changed either crashes (another rank) or, worse, silently trains something else (another batch
size, another dataset). So resuming compares the settings stored in the checkpoint with the new ones and
stops with one line listing every difference. The learning rate, the schedule's length and shape,
validation, checkpoint cadence, logging and the memory and speed settings may change; the change takes
effect and is recorded in settings.json (see ``sd3booth.train.settings``).

Everything here is a pure function of settings dicts, except ``check_resume`` (reads the checkpoint and
the data folder) and ``apply_learning_rate`` (sets the restored scheduler to the new rate).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sd3booth.config import DEFAULT_LORA_LAYERS, FIELDS, TrainConfig
from sd3booth.errors import UserError

# Settings that define the run: a resume must use the checkpoint's values.
DEFINES_RUN: tuple[str, ...] = (
    # model
    "pretrained_model_name_or_path",
    "clip_l",
    "clip_g",
    "t5xxl",
    "single_file_config",
    "revision",
    "variant",
    "t5_precision",
    "max_sequence_length",
    # adapter
    "rank",
    "lora_alpha",
    "lora_dropout",
    "lora_layers",
    "lora_blocks",
    # data as the trainer sees it (the files and captions are compared by content, see data_fingerprint)
    "resolution",
    "center_crop",
    "random_flip",
    "repeats",
    "train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "with_prior_preservation",
    "class_prompt",
    "num_class_images",
    "prior_loss_weight",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "masked_loss",
    "alpha_mask",
    "caption_dropout_rate",
    # the objective
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "precondition_outputs",
    # the optimizer (its restored state carries these)
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "prodigy_beta3",
    "prodigy_decouple",
    "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
    # issue #12's methods: the adapter, the text-encoder LoRA, the optimizers' own settings, EMA, loss, prior
    "lora_type",
    "lokr_factor",
    "train_text_encoder",
    "text_encoder_rank",
    "lion_beta1",
    "lion_beta2",
    "adafactor_relative_step",
    "adafactor_scale_parameter",
    "adafactor_warmup_init",
    "adafactor_clip_threshold",
    "adafactor_decay_rate",
    "schedulefree_r",
    "schedulefree_weight_lr_power",
    "use_ema",
    "ema_decay",
    "loss_type",
    "huber_c",
    "prior_preservation_mode",
)

# Settings a resume may change; the README lists them. The new value is used from the resumed step on.
MAY_CHANGE: tuple[str, ...] = (
    # learning rate and schedule
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "max_train_steps",
    "num_train_epochs",
    "max_grad_norm",
    "max_bad_steps",
    # validation
    "validation_prompt",
    "num_validation_images",
    "validation_epochs",
    "validation_steps",
    "num_inference_steps",
    "guidance_scale",
    "sample_batch_size",
    "validation_prompt_file",
    "width",
    "height",
    # checkpoints and logging
    "checkpointing_steps",
    "checkpoints_total_limit",
    "report_to",
    "logging_dir",
    "logging_steps",
    # memory and speed (another GPU, another budget)
    "max_vram",
    "max_ram",
    "base_precision",
    "blocks_to_swap",
    "swap_dtype",
    "checkpoint_blocks",
    "activation_offload",
    "vae_tiling",
    "compile",
    "cuda_graphs",
    "base_compute",
    "attention_backend",
    "gradient_checkpointing",
    "mixed_precision",
    "allow_tf32",
    "num_cpu_threads",
    "text_encoder_lr",
    "ema_device",
)

# Not compared as settings: where things are, this command's own switches, or compared another way.
NOT_COMPARED: dict[str, str] = {
    "output_dir": "a location",
    "cache_dir": "a location",
    "class_data_dir": "a location",
    "resume_from_checkpoint": "this command's switch",
    "overwrite_output_dir": "this command's switch",
    "instance_data_dir": "the dataset is compared by content",
    "dataset_name": "the dataset is compared by content",
    "caption_column": "the captions are compared by content",
    "image_column": "the dataset is compared by content",
    "instance_prompt": "the captions are compared by content",
    "use_8bit_adam": "compared as --optimizer",
    "use_dora": "compared as --lora_type",
    "mask_dir": "a location (each mask's content keys its cache entry)",
    "dataset_config": "its folders' images and captions are compared by content, its layout by the data order",
    "init_lora": "only where a new run starts; a resume continues from the checkpoint",
    "lora_format": "how the result is written",
    "save_precision": "how the result is written",
    "upcast_before_saving": "how the result is written",
    "push_to_hub": "where the result goes",
    "hub_model_id": "where the result goes",
    "hub_token": "a credential",
    "dataset_config_name": "the dataset is compared by content",
    **{
        name: "accepted for the diffusers script; no effect"
        for name in (
            "cache_latents",
            "dataloader_num_workers",
            "local_rank",
            "prior_generation_precision",
            "adam_weight_decay_text_encoder",
        )
    },
}


def _model(v: Any) -> Any:
    if not v:
        return v
    p = Path(str(v)).expanduser()
    return str(p.resolve()) if p.exists() else v


def _value(settings: dict[str, Any], name: str) -> Any:
    """The value a setting has in effect (defaults and synonyms resolved), for comparison."""
    v = settings.get(name)
    if name == "lora_alpha":
        return v if v is not None else settings.get("rank")
    if name == "lora_layers":
        return sorted({s.strip() for s in (v or "").split(",") if s.strip()} or set(DEFAULT_LORA_LAYERS))
    if name == "lora_blocks":
        return sorted({int(s) for s in str(v).split(",") if s.strip()}) if v else None
    if name == "optimizer":
        return "adamw8bit" if settings.get("use_8bit_adam") else v
    if name == "lora_type":
        return "dora" if settings.get("use_dora") else v
    if name == "seed":
        return v if v is not None else 0
    if name in ("pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "single_file_config"):
        return _model(v)
    return v


def _relevant(settings: dict[str, Any], name: str) -> bool:
    """False for a setting that has no effect under the others (a Prodigy knob on an AdamW run, ...)."""
    if name.startswith("prodigy_"):
        return _value(settings, "optimizer") == "prodigy"
    owners = {"lion_": ("lion", "lion8bit"), "adafactor_": ("adafactor",), "schedulefree_": ("adamw_schedulefree",)}
    for prefix, optimizers in owners.items():
        if name.startswith(prefix):
            return _value(settings, "optimizer") in optimizers
    if name in ("lokr_factor", "text_encoder_rank", "ema_decay", "huber_c", "prior_preservation_mode"):
        switch = {"lokr_factor": _value(settings, "lora_type") == "lokr", "ema_decay": settings.get("use_ema"),
                  "text_encoder_rank": settings.get("train_text_encoder"), "huber_c": settings.get("loss_type") != "l2",
                  "prior_preservation_mode": settings.get("with_prior_preservation")}  # fmt: skip
        return bool(switch[name])
    if name in ("class_prompt", "num_class_images", "prior_loss_weight"):
        return bool(settings.get("with_prior_preservation"))
    if name in ("logit_mean", "logit_std"):
        return settings.get("weighting_scheme") == "logit_normal"
    if name == "mode_scale":
        return settings.get("weighting_scheme") == "mode"
    return True


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, old, new) of every run-defining setting that differs; names the old dict lacks (a checkpoint
    of another version) are not compared."""
    out = []
    for name in DEFINES_RUN:
        if name not in old or not (_relevant(old, name) or _relevant(new, name)):
            continue
        if name == "lora_alpha" and old.get(name) is None and new.get(name) is None:
            continue  # alpha = rank on both sides: a rank difference says it all
        a, b = _value(old, name), _value(new, name)
        if a != b:
            out.append((name, a, b))
    return out


def changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{name: [old, new]} of the settings a resume may change that it did change (for settings.json)."""
    return {n: [old.get(n), new.get(n)] for n in MAY_CHANGE if n in old and old.get(n) != new.get(n)}


def _show(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def data_fingerprint(examples: Sequence[Any], digest: Callable[[Path], str]) -> dict[str, Any]:
    """What the dataset is, independent of where it lies: the number of images and a hash of every
    (image bytes, caption) pair."""
    pairs = sorted(f"{digest(ex.path)}\t{ex.caption}" for ex in examples)
    h = hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]
    return {"images": len(pairs), "digest": h}


def describe(diffs: list[tuple[str, Any, Any]], old_data: dict | None, new_data: dict | None) -> list[str]:
    """'--flag old -> new' per difference, and the dataset's difference if any."""
    parts = [f"--{name} {_show(a)} -> {_show(b)}" for name, a, b in diffs]
    if old_data and new_data and old_data.get("digest") != new_data.get("digest"):
        if old_data.get("images") != new_data.get("images"):
            parts.append(f"dataset {old_data.get('images')} -> {new_data.get('images')} images")
        else:
            parts.append(f"dataset content ({new_data.get('images')} images, other files or captions)")
    return parts


def check_resume(
    cfg: TrainConfig, output_dir: Path, examples: Sequence[Any] | None, record: dict[str, Any] | None
) -> Path | None:
    """The checkpoint this run resumes from, after checking it is whole and was trained with the same
    run-defining settings and dataset (``record``: the folder's settings.json, for the dataset's fingerprint);
    one UserError line listing every difference otherwise. Reads only."""
    from sd3booth.data.dataset import file_digest
    from sd3booth.train import checkpoint

    if not cfg.resume_from_checkpoint:
        return None
    path = checkpoint.find(output_dir / "checkpoints", cfg.resume_from_checkpoint)
    if path is None:
        return None
    reason = checkpoint.damage(path)
    if reason:
        raise UserError(checkpoint.damaged_message(path, reason))
    meta = checkpoint.read_meta(path)
    old = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    record = record or {}
    old_data = record.get("data") if isinstance(record.get("data"), dict) else None
    new_data = data_fingerprint(examples, file_digest) if examples is not None and old_data else None
    parts = describe(differences(old, cfg.to_dict()), old_data, new_data)
    if parts:
        raise UserError(
            f"--resume_from_checkpoint: {path} was trained with other settings: {'; '.join(parts)}. Resume with "
            "the checkpoint's values (only the learning rate and its schedule, validation, checkpoint, logging, "
            "memory and speed settings may change), or start a new run (--overwrite_output_dir or another "
            "--output_dir)"
        )
    return path


def apply_learning_rate(optimizer: Any, lr_scheduler: Any, base_lrs: list[float]) -> None:
    """After the optimizer and scheduler states are restored (which restores the old base rate), makes this
    run's base rates ``base_lrs`` and schedule the ones in effect from the resumed step on; changes nothing
    if both are as saved."""
    groups = optimizer.param_groups
    if list(getattr(lr_scheduler, "base_lrs", [])) != list(base_lrs):
        lr_scheduler.base_lrs = list(base_lrs)
        for g, lr in zip(groups, base_lrs):
            g["initial_lr"] = lr
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    step = lr_scheduler.last_epoch
    new = [base * fn(step) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
    for g, value in zip(groups, new):
        if g["lr"] != value:
            g["lr"] = value
    lr_scheduler._last_lr = [g["lr"] for g in groups]


def unclassified() -> list[str]:
    """Settings in none (or more than one) of DEFINES_RUN, MAY_CHANGE, NOT_COMPARED: a test keeps this empty."""
    groups = (set(DEFINES_RUN), set(MAY_CHANGE), set(NOT_COMPARED))
    return sorted(n for n in set(FIELDS) | set().union(*groups) if sum(n in g for g in groups) != 1 or n not in FIELDS)
