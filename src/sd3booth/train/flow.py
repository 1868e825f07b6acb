"""Rectified-flow training maths of SD3, as pure functions (the diffusers reference, step by step).

Timestep densities and loss weightings come from ``diffusers.training_utils`` so they stay identical to
the reference; the rest is four lines of algebra kept here so the training loop reads like the paper.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


def sample_indices(
    weighting_scheme: str,
    batch_size: int,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    num_train_timesteps: int,
) -> torch.Tensor:
    """Indices into the scheduler's training timesteps, drawn from the scheme's density (global RNG)."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def sigmas_and_timesteps(
    indices: torch.Tensor, scheduler_sigmas: torch.Tensor, scheduler_timesteps: torch.Tensor, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma broadcastable to an ndim latent, timestep fed to the transformer = sigma * 1000 after shift).

    The reference looks each timestep up again in ``scheduler.timesteps``; the timesteps are distinct,
    so the index is the position and the lookup is the identity.
    """
    sigma = scheduler_sigmas[indices].float()
    timesteps = scheduler_timesteps[indices]
    return sigma.reshape(-1, *([1] * (ndim - 1))), timesteps


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise."""
    return (1.0 - sigma) * x0 + sigma * noise


def prediction(model_out: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, precondition: bool) -> torch.Tensor:
    """With preconditioning the model's velocity becomes a denoised estimate: x_t - sigma v."""
    return x_t - sigma * model_out if precondition else model_out


def target(x0: torch.Tensor, noise: torch.Tensor, precondition: bool) -> torch.Tensor:
    """x0 with preconditioning, else the velocity noise - x0."""
    return x0 if precondition else noise - x0


def loss_weighting(weighting_scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    return compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigma)


def elementwise_loss(
    pred: torch.Tensor, tgt: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
) -> torch.Tensor:
    """l2: (pred - target)^2, the reference. huber and smooth_l1 are kohya's pseudo-Huber forms (its flag names):
    huber 2c(sqrt(d^2 + c^2) - c) ~ d^2 near 0 and 2c|d| far out; smooth_l1 2(sqrt(d^2 + c^2) - c) ~ d^2 / c
    near 0 and 2|d| far out. Smooth everywhere, unlike torch's piecewise huber_loss."""
    d2 = (pred.float() - tgt.float()) ** 2
    if loss_type == "l2":
        return d2
    root = torch.sqrt(d2 + huber_c**2) - huber_c
    if loss_type == "huber":
        return 2 * huber_c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss type {loss_type!r}")


def per_sample_loss(
    pred: torch.Tensor, tgt: torch.Tensor, weighting: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
) -> torch.Tensor:
    """mean over all but the batch dim of w * loss(pred, target), in fp32: shape (B,)."""
    err = weighting.float() * elementwise_loss(pred, tgt, loss_type, huber_c)
    return err.reshape(err.shape[0], -1).mean(dim=1)


def dreambooth_loss(per_sample: torch.Tensor, n_instance: int, prior_loss_weight: float) -> torch.Tensor:
    """Mean instance loss + prior_loss_weight * mean prior loss; the batch is instances then class images."""
    inst = per_sample[:n_instance].mean()
    if n_instance < per_sample.shape[0]:
        return inst + prior_loss_weight * per_sample[n_instance:].mean()
    return inst
