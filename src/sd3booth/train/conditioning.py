"""What the transformer is conditioned on in one micro-step, beyond the cached embeddings of the batch:

* ``--prior_preservation_mode base_model``: the class prompt is appended for every instance (the same noisy
  latents run twice), and the prior's target comes from the base model (adapter off) on that prompt;
* ``--train_text_encoder``: the CLIP part of every embedding is recomputed through the CLIP LoRAs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from sd3booth.train.batch import batch_captions, to_device


def conditioning(
    run: Any, m: int, n: int, prompt_embeds: torch.Tensor, pooled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    """(prompt embeds, pooled, base-model prior or None) of micro-batch m, whose n latents are instances."""
    cfg, dev = run.cfg, run.place.device
    captions = batch_captions(run.batches, m, run.accelerator.process_index)
    base_prior = None
    if cfg.base_model_prior:  # the class prompt on the same latents; its target is the base model's prediction
        cls_embeds = to_device(run.class_embedding.prompt_embeds, dev).expand(n, *prompt_embeds.shape[1:])
        cls_pooled = to_device(run.class_embedding.pooled, dev).expand(n, *pooled.shape[1:])
        captions += [cfg.class_prompt or ""] * n
        prompt_embeds, pooled = torch.cat([prompt_embeds, cls_embeds]), torch.cat([pooled, cls_pooled])
        base_prior = functools.partial(_base_prediction, run, cls_embeds, cls_pooled)
    if run.text is not None:  # CLIP with its LoRA on the batch's token ids; T5's part stays the cached one
        with run.accelerator.autocast():
            prompt_embeds, pooled = run.text.embed(captions, prompt_embeds)
    return prompt_embeds, pooled, base_prior


def _base_prediction(
    run: Any, embeds: torch.Tensor, pooled: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The base model (adapter off, called without grad by the loss) on the class prompt's cached embedding:
    cached by the base text encoders, so it is the base model's conditioning even with --train_text_encoder."""
    net = run.accelerator.unwrap_model(run.transformer)
    net.disable_adapters()
    try:
        with run.accelerator.autocast():
            return net(
                hidden_states=x_t.to(run.place.weight_dtype), timestep=timesteps, encoder_hidden_states=embeds,
                pooled_projections=pooled, return_dict=False,
            )[0]  # fmt: skip
    finally:
        net.enable_adapters()
