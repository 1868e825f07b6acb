"""Flags of diffusers' ``train_dreambooth_lora_sd3.py`` that this tool does not need: each is accepted, and a
command that sets one prints a line saying why it changes nothing (the run continues)."""

from __future__ import annotations

from sd3booth.config.settings import FIELDS, TrainConfig

NOT_NEEDED = {
    "cache_latents": "latents are always cached, keyed by image content, and reused by later runs",
    "dataloader_num_workers": "batches come from the in-memory latent and text caches, no loader to parallelise",
    "local_rank": "accelerate launch gives each process its rank",
    "prior_generation_precision": "class images are generated in the run's own precision (--mixed_precision and "
    "the memory plan)",
    "adam_weight_decay_text_encoder": "the text-encoder LoRA (--train_text_encoder) uses --adam_weight_decay "
    "like the transformer's",
}


def compat_notes(cfg: TrainConfig) -> list[str]:
    """One line per diffusers-script flag that was set to something other than its default but changes nothing."""
    notes = [
        f"note: --{name} is accepted but not needed: {why}; continuing"
        for name, why in NOT_NEEDED.items()
        if getattr(cfg, name) != FIELDS[name].default
    ]
    if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:  # the diffusers script ignores it too
        notes.append("note: --text_encoder_lr has no effect without --train_text_encoder; continuing")
    return notes
