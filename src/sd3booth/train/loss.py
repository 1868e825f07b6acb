"""The loss the training loop runs: SD3 flow matching composed from the pure maths in ``flow``.

``flow_matching_loss`` is what each micro-step calls; tests compare it with the diffusers reference's own
formulas for every weighting scheme, with and without preconditioning and prior preservation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sd3booth.train import flow
from sd3booth.train.batch import to_device

# (noisy latents, timesteps) -> the transformer's output (velocity)
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowSettings:
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    prior_loss_weight: float = 1.0
    loss_type: str = "l2"
    huber_c: float = 0.1


def flow_matching_loss(
    model: Model,
    x0: torch.Tensor,
    n_instance: int,
    scheduler_sigmas: torch.Tensor,
    scheduler_timesteps: torch.Tensor,
    settings: FlowSettings,
    base_prior: Model | None = None,
) -> torch.Tensor:
    """Draws timesteps (global CPU RNG) and noise (x0's device RNG), runs the model, returns the scalar loss.

    The batch holds ``n_instance`` instance samples, then class samples weighted by ``prior_loss_weight``.
    With ``base_prior`` (``--prior_preservation_mode base_model``) x0 holds instances only; ``model`` then runs
    on the noisy latents twice over (instance prompts, then the class prompt) and the class half's target is
    ``base_prior``'s prediction on the same noisy latents (the base model, class prompt, no gradient).
    """
    s = settings
    n_timesteps = len(scheduler_timesteps)  # the training scheduler's num_train_timesteps
    idx = flow.sample_indices(s.weighting_scheme, x0.shape[0], s.logit_mean, s.logit_std, s.mode_scale, n_timesteps)
    idx = to_device(idx, x0.device)
    sigma, timesteps = flow.sigmas_and_timesteps(idx, scheduler_sigmas, scheduler_timesteps, x0.ndim)
    noise = torch.randn_like(x0)
    x_t = flow.noisy_latents(x0, noise, sigma)
    tgt = flow.target(x0, noise, s.precondition_outputs)
    if base_prior is not None:
        with torch.no_grad():
            base = flow.prediction(base_prior(x_t, timesteps).float(), x_t, sigma, s.precondition_outputs)
        x_t, sigma, timesteps = torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([timesteps, timesteps])
        tgt = torch.cat([tgt, base])
    pred = flow.prediction(model(x_t, timesteps).float(), x_t, sigma, s.precondition_outputs)
    weighting = flow.loss_weighting(s.weighting_scheme, sigma)
    per_sample = flow.per_sample_loss(pred, tgt, weighting, s.loss_type, s.huber_c)
    return flow.dreambooth_loss(per_sample, n_instance, s.prior_loss_weight)
