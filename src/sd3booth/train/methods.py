"""The run set-up of issue #12's methods, kept out of the loop: text-encoder LoRA, the optimizer's parameter
groups and own settings, EMA. Like ``loop.setup`` these map a run's settings onto the components."""

from __future__ import annotations

from typing import Any

import torch

from sd3booth.adapters import text_encoder as clip_lora
from sd3booth.errors import UserError
from sd3booth.report import write_report_safely
from sd3booth.train.ema import EMA, export_view
from sd3booth.train.optim import make_optimizer, optimizer_options


def load_text_encoders(run: Any) -> None:
    """--train_text_encoder: CLIP-L and CLIP-G with their LoRA stay on the device (T5 stays cached)."""
    cfg = run.cfg
    if not cfg.train_text_encoder:
        return
    with run.stages.stage("load text encoders"):
        captions = [*run.prep.text_keys, cfg.class_prompt or ""]
        rank = cfg.text_encoder_rank or cfg.rank
        run.text = clip_lora.load_text_encoders(run.prep.src, run.place, captions, rank, cfg.lora_dropout)


def optimizer(run: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer over the transformer's adapter and (own rate) the text encoders' LoRA; ``run.params``
    becomes every trainable parameter."""
    cfg = run.cfg
    groups = [{"params": run.params}]
    if run.text is not None:
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        groups.append({"params": run.text.params(), "lr": te_lr * lr / cfg.learning_rate})
        run.params = [*run.params, *run.text.params()]
    name, betas = cfg.optimizer_name, (cfg.adam_beta1, cfg.adam_beta2)
    opt = make_optimizer(name, groups, lr, betas, cfg.adam_weight_decay, cfg.adam_epsilon, optimizer_options(name, cfg))
    if hasattr(opt, "train"):  # schedule-free optimizers start each run in training mode
        opt.train()
    return opt


def attach(run: Any) -> None:
    """After accelerate prepared the transformer: the text encoders likewise, and the EMA of every adapter."""
    cfg = run.cfg
    if run.text is not None:
        run.text.encoders = list(run.accelerator.prepare(*run.text.encoders))
    if cfg.use_ema:
        device = run.place.device if cfg.ema_device == "gpu" else torch.device("cpu")
        run.ema = EMA(run.params, cfg.ema_decay, device)


def restore_ema(run: Any, trainer_state: dict[str, Any]) -> None:
    if run.ema is None:
        return
    if "ema" not in trainer_state:
        raise UserError(f"{run.resume_path} was saved without --use_ema; resume it without --use_ema")
    run.ema.load_state_dict(trainer_state["ema"])


def validation_due(run: Any, step: int) -> bool:
    """Whether validation runs after ``step``: every --validation_steps, else every --validation_epochs."""
    cfg = run.cfg
    if cfg.validation_steps:
        return step % cfg.validation_steps == 0
    done = run.completed_epochs(step)
    return done > run.completed_epochs(step - 1) and done % cfg.validation_epochs == 0


def validate(run: Any, step: int) -> None:
    """Validation images with the exported weights (EMA, schedule-free average); with a text-encoder LoRA the
    validation prompts go through it (the cached embeddings are the base encoders')."""
    if run.validator is None:
        return
    with run.stages.stage(f"validation step {step}"), export_view(run.optimizer.optimizer, run.ema, run.params):
        if run.text is not None and run.validation_cached:
            prompts, negative = run.validation_cached
            run.validator.prompts = [run.text.embedding(text, cached) for text, cached in prompts]
            run.validator.negative = run.text.embedding("", negative)
        images = run.validator(run.accelerator.unwrap_model(run.transformer), step, run.compiled)
    tb = next((t.writer for t in getattr(run.accelerator, "trackers", []) if t.name == "tensorboard"), None)
    if tb is not None:
        import numpy as np

        tb.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    write_report_safely(run.out, run.stages.records, run.cfg.to_dict(), run.say)  # the report, with these images
