"""Building one micro-batch from the caches: latent sample, crop, flip, scaling, and its caption embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd3booth.cache.text import TextEmbedding
from sd3booth.data.dataset import Example
from sd3booth.train.order import DataOrder, step_seed


@dataclass(frozen=True)
class BatchSource:
    """Everything a micro-batch is made from; fixed for the whole run."""

    instances: list[Example]
    classes: list[Example]
    items: list[int]  # instance index per (repeated) item
    order: DataOrder
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]]  # cache key -> (mean, std)
    latent_keys: dict[tuple[str, bool], str]  # (example uid, flipped) -> cache key
    text: dict[str, TextEmbedding]  # cache key -> embedding
    text_keys: dict[str, str]  # caption -> cache key
    latent_size: int  # training crop, latent pixels
    center_crop: bool
    random_flip: bool
    shift_factor: float
    scaling_factor: float
    seed: int


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned + non_blocking on CUDA: a copy from pageable memory would first wait for the GPU to drain its
    queue, a host sync per copy that stops the CPU from queueing the next step's kernels ahead of the GPU."""
    cuda = device.type == "cuda"
    return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)


def crop(z: torch.Tensor, size: int, center: bool) -> torch.Tensor:
    """A size x size window of a (C, H, W) latent: centred, or at a random offset (global RNG)."""
    h, w = z.shape[-2:]
    if center:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top = int(torch.randint(0, h - size + 1, ()).item()) if h > size else 0
        left = int(torch.randint(0, w - size + 1, ()).item()) if w > size else 0
    return z[:, top : top + size, left : left + size]


def make_batch(src: BatchSource, m: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 latents, prompt embeds, pooled) of micro-batch m on the CPU: instances first, then class images.

    Seeds the global RNG for this micro-batch, so everything random that follows (timesteps, noise) is too.
    """
    torch.manual_seed(step_seed(src.seed, m, rank))
    examples = [src.instances[src.items[i]] for i in src.order.instance_items(m, rank)]
    if src.classes:
        examples += [src.classes[i] for i in src.order.class_items(m, rank)]
    zs, embeds, pooled = [], [], []
    for ex in examples:
        flip = src.random_flip and bool(torch.rand(()) < 0.5)
        mean, std = src.latents[src.latent_keys[(ex.uid, flip)]]
        z = crop(mean + std * torch.randn_like(mean), src.latent_size, src.center_crop)
        zs.append((z - src.shift_factor) * src.scaling_factor)
        emb = src.text[src.text_keys[ex.caption]]
        embeds.append(emb.prompt_embeds)
        pooled.append(emb.pooled)
    return torch.stack(zs), torch.stack(embeds), torch.stack(pooled)


def batch_captions(src: BatchSource, m: int, rank: int) -> list[str]:
    """The captions of micro-batch m, in make_batch's order (no RNG drawn: the order is a pure function)."""
    examples = [src.instances[src.items[i]] for i in src.order.instance_items(m, rank)]
    if src.classes:
        examples += [src.classes[i] for i in src.order.class_items(m, rank)]
    return [ex.caption for ex in examples]
