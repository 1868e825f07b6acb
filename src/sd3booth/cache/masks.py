"""Mask cache (``--masked_loss``): each image's mask at latent resolution, stored beside its latents.

A mask entry is keyed by the mask's own bytes (or the image's, for an alpha mask) and the resize and crop
of its latent (:func:`~sd3booth.cache.latents.geometry`), so editing a mask re-makes only the mask, and the
mask's pixels always line up with the latent's. Masks are stored unflipped; the trainer flips a mask
together with its latent. No model is needed: masks are made with PIL alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sd3booth.cache.latents import LatentSpec, geometry
from sd3booth.cache.store import TensorStore, content_key
from sd3booth.data import dataset
from sd3booth.data.buckets import Size
from sd3booth.data.masks import latent_mask


def mask_key(digest: str, alpha: bool, spec: LatentSpec) -> str:
    """The mask file's bytes, where in it the mask is read (alpha or luminance) and its resize and crop."""
    return content_key(kind="mask", mask=digest, alpha=alpha, **geometry(spec))


def ensure_masks(
    jobs: Sequence[tuple[dataset.Example, Path, bool, LatentSpec]],
    cache_root: Path,
    log: Callable[[str], None] = print,
) -> dict[tuple[str, Size], str]:
    """Makes sure the mask of every (example, mask file, read its alpha?, spec) is cached; returns
    (uid, training size) -> cache key."""
    store = TensorStore(cache_root / "latents")
    keys: dict[tuple[str, Size], str] = {}
    todo = []
    for ex, path, alpha, spec in jobs:
        k = mask_key(dataset.file_digest(path), alpha, spec)
        if k not in keys.values() and not store.usable(k, {"mask": (1, None, None)}):
            todo.append((ex, path, alpha, spec, k))
        keys[(ex.uid, spec.size)] = k
    if todo:
        log(f"making {len(todo)} loss mask(s) ({len(set(keys.values())) - len(todo)} cached)")
    for ex, path, alpha, spec, k in todo:
        mask = latent_mask(path, alpha, spec.bucket, spec.resolution, spec.center_crop)
        store.put(k, {"mask": mask}, metadata={"image": ex.id, "mask": str(path)})
    return keys


def load_masks(keys: Sequence[str], cache_root: Path) -> dict[str, torch.Tensor]:
    """key -> (1, h, w) fp32 mask in CPU memory."""
    store = TensorStore(cache_root / "latents")
    return {k: store.get(k)["mask"] for k in dict.fromkeys(keys)}
