"""Building one micro-batch from the caches: latent sample, crop, flip, scaling, masks, and caption embeddings
(some replaced by the empty prompt's under ``--caption_dropout_rate``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd3booth.cache.text import TextEmbedding
from sd3booth.data.buckets import Size
from sd3booth.data.concepts import Item
from sd3booth.data.dataset import Example
from sd3booth.train.order import DataOrder, step_seed

_DROPOUT_SALT = 0x9E3779B97F4A7C15  # caption dropout draws from its own generator: other draws stay as they were


@dataclass(frozen=True)
class BatchSource:
    """Everything a micro-batch is made from; fixed for the whole run."""

    instances: list[Example]
    classes: list[Example]
    items: list[Item]  # one epoch: instance, paired class image, training size (see data.concepts)
    order: DataOrder
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]]  # cache key -> (mean, std)
    latent_keys: dict[tuple[str, Size, bool], str]  # (example uid, training size, flipped) -> cache key
    text: dict[str, TextEmbedding]  # cache key -> embedding
    text_keys: dict[str, str]  # caption -> cache key
    center_crop: bool
    random_flip: bool
    shift_factor: float
    scaling_factor: float
    seed: int
    prior_weights: tuple[float, ...] = (1.0,)  # per concept
    empty_key: str | None = None  # the empty prompt's embedding (caption dropout)
    caption_dropout_rate: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # cache key -> (1, h, w) latent-size mask
    mask_keys: dict[tuple[str, Size], str] = field(default_factory=dict)  # (uid, size) -> key; empty: no masks


@dataclass(frozen=True)
class Batch:
    """One micro-batch on the CPU: instance samples first, then class samples."""

    x0: torch.Tensor  # (B, C, h, w) scaled latents
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    n_instance: int
    prior_weight: float | torch.Tensor  # one weight for every class sample, or one each (several concepts)
    mask: torch.Tensor | None = None  # (B, 1, h, w) loss weights; None without --masked_loss


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned + non_blocking on CUDA: a copy from pageable memory would first wait for the GPU to drain its
    queue, a host sync per copy that stops the CPU from queueing the next step's kernels ahead of the GPU."""
    cuda = device.type == "cuda"
    return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)


def window(h: int, w: int, size: tuple[int, int], center: bool) -> tuple[int, int]:
    """(top, left) of a size = (height, width) window in an h x w latent: centred, or random (global RNG)."""
    sh, sw = size
    if center:
        return (h - sh) // 2, (w - sw) // 2
    top = int(torch.randint(0, h - sh + 1, ()).item()) if h > sh else 0
    left = int(torch.randint(0, w - sw + 1, ()).item()) if w > sw else 0
    return top, left


def crop(z: torch.Tensor, size: int, center: bool) -> torch.Tensor:
    """A size x size window of a (C, H, W) latent: centred, or at a random offset (global RNG)."""
    top, left = window(*z.shape[-2:], (size, size), center)
    return z[:, top : top + size, left : left + size]


def _sample(src: BatchSource, ex: Example, size: Size) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One example's scaled latent (a fresh sample of the cached distribution, cropped) and its mask window."""
    flip = src.random_flip and bool(torch.rand(()) < 0.5)
    mean, std = src.latents[src.latent_keys[(ex.uid, size, flip)]]
    z = mean + std * torch.randn_like(mean)
    lh, lw = size[1] // 8, size[0] // 8
    top, left = window(*z.shape[-2:], (lh, lw), src.center_crop)
    z = z[:, top : top + lh, left : left + lw]
    mask = None
    if src.mask_keys:
        key = src.mask_keys.get((ex.uid, size))
        if key is None:  # class images train everywhere
            mask = torch.ones(1, lh, lw)
        else:
            m = src.masks[key].flip(-1) if flip else src.masks[key]
            mask = m[:, top : top + lh, left : left + lw]
    return (z - src.shift_factor) * src.scaling_factor, mask


def _pairs(src: BatchSource, items: list[Item]) -> list[tuple[Example, Size]]:
    """(example, training size) of each sample: the items' instance images, then their class images."""
    pairs = [(src.instances[it.instance], it.size) for it in items]
    return pairs + [(src.classes[it.cls], it.size) for it in items if it.cls is not None]


def _captions(
    src: BatchSource, m: int, rank: int, items: list[Item], pairs: list[tuple[Example, Size]]
) -> list[str | None]:
    """Each sample's caption, None where caption dropout gives it the empty prompt (instances only)."""
    captions: list[str | None] = [ex.caption for ex, _ in pairs]
    if src.caption_dropout_rate > 0 and src.empty_key is not None:
        g = torch.Generator().manual_seed((step_seed(src.seed, m, rank) + _DROPOUT_SALT) % 2**63)
        drop = torch.rand(len(items), generator=g) < src.caption_dropout_rate
        captions = [None if i < len(items) and bool(drop[i]) else c for i, c in enumerate(captions)]
    return captions


def batch_captions(src: BatchSource, m: int, rank: int) -> list[str]:
    """The captions of micro-batch m in make_batch's order, "" where dropped (no global RNG drawn)."""
    items = [src.items[i] for i in src.order.items(m, rank)]
    return [c if c is not None else "" for c in _captions(src, m, rank, items, _pairs(src, items))]


def make_batch(src: BatchSource, m: int, rank: int) -> Batch:
    """Micro-batch m on process ``rank``: its items' instance images, then their class images.

    Seeds the global RNG for this micro-batch, so everything random that follows (timesteps, noise) is too.
    """
    torch.manual_seed(step_seed(src.seed, m, rank))
    items = [src.items[i] for i in src.order.items(m, rank)]
    pairs = _pairs(src, items)
    weights = [src.prior_weights[it.concept] for it in items if it.cls is not None]
    samples = [_sample(src, ex, size) for ex, size in pairs]
    captions = _captions(src, m, rank, items, pairs)
    embeds = [src.text[src.text_keys[c] if c is not None else src.empty_key] for c in captions]
    masks = [mk for _, mk in samples]
    return Batch(
        torch.stack([z for z, _ in samples]),
        torch.stack([e.prompt_embeds for e in embeds]),
        torch.stack([e.pooled for e in embeds]),
        len(items),
        weights[0] if len(set(weights)) == 1 else torch.tensor(weights) if weights else 1.0,
        torch.stack(masks) if src.mask_keys else None,
    )
