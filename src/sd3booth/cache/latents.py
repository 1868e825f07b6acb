"""Latent cache: the VAE encodes each (image content, training size, crop, flip) once.

The entry holds the latent distribution's mean and std (not one sample), so training can draw a fresh
sample every step as the un-cached reference does. Keys hash the image bytes, never a position in a
shuffled loop (the diffusers reference's ``--cache_latents`` bug, diffusers #14430).

Without ``center_crop`` the latent of the whole resized image is cached and the trainer crops a random
window in latent space each step (8-pixel granularity), instead of freezing one random crop at start-up.
With aspect-ratio buckets the image is resized to cover its bucket and only the remainder (at most one
bucket step) is left for that window; the bucket's size is part of the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sd3booth.cache.store import TensorStore, content_key
from sd3booth.data import dataset
from sd3booth.data.buckets import Size, fit_to_bucket
from sd3booth.models import loaders
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource


@dataclass(frozen=True)
class LatentSpec:
    """Everything besides the image bytes that decides a cached latent."""

    resolution: int
    center_crop: bool
    flip: bool
    tiled: bool = False  # tiled encoding blends tile seams: slightly different latents, so its own entries
    bucket: Size | None = None  # aspect-ratio bucket (w, h); None: the square crop at `resolution`

    @property
    def size(self) -> Size:
        """The training size (w, h) in pixels."""
        return self.bucket or (self.resolution, self.resolution)

    def pixels(self, path: Path) -> torch.Tensor:
        """The (3, H, W) pixels in [-1, 1] that are encoded: resized and cropped, flipped if asked."""
        img = dataset.load_image(path)
        if self.bucket is not None:
            img = fit_to_bucket(img, self.bucket, self.center_crop)
        else:
            img = dataset.resize_and_crop(img, self.resolution, self.center_crop)
        return dataset.to_tensor(img, flip=self.flip)


def geometry(spec: LatentSpec) -> dict[str, object]:
    """The key parts of a spec's resize and crop (shared with the mask cache)."""
    if spec.bucket is not None:
        return {"bucket": f"{spec.bucket[0]}x{spec.bucket[1]}", "center_crop": spec.center_crop}
    return {"res": spec.resolution, "center_crop": spec.center_crop}


def latent_key(digest: str, spec: LatentSpec, vae_identity: str, vae_numerics: str) -> str:
    """Everything that changes the stored latent: image bytes, size, crop, flip, tiling, VAE and its dtype/device."""
    return content_key(
        kind="latent",
        image=digest,
        **geometry(spec),
        flip=spec.flip,
        tiled=spec.tiled,
        vae=vae_identity,
        numerics=vae_numerics,
    )


def ensure_latents(
    jobs: Sequence[tuple[dataset.Example, LatentSpec]],
    src: ModelSource,
    place: Placement,
    cache_root: Path,
    log: Callable[[str], None] = print,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> dict[tuple[str, Size, bool], str]:
    """Makes sure every (example, spec) latent is on disk; returns (example uid, size, flip) -> cache key.

    The VAE is loaded only if something is missing, and freed before returning.
    """
    store = TensorStore(cache_root / "latents")
    store.clean_temporaries()  # left by a run killed mid-write
    vae_id = src.identity("vae")
    numerics = f"{str(place.vae_dtype).removeprefix('torch.')}@{place.device.type}"
    channels = json.loads((src.root / "vae" / "config.json").read_text(encoding="utf-8")).get("latent_channels")
    expected = {"mean": (channels, None, None), "std": (channels, None, None)}
    keys: dict[tuple[str, Size, bool], str] = {}
    todo: list[tuple[dataset.Example, LatentSpec, str]] = []
    digests: dict[Path, str] = {}
    for ex, spec in jobs:
        if ex.path not in digests:
            digests[ex.path] = dataset.file_digest(ex.path)
        k = latent_key(digests[ex.path], spec, vae_id, numerics)
        if k not in keys.values() and not store.usable(k, expected):
            todo.append((ex, spec, k))
        keys[(ex.uid, spec.size, spec.flip)] = k
    if not todo:
        return keys
    log(f"encoding {len(todo)} latent(s) ({len(set(keys.values())) - len(todo)} cached)")
    with stage("VAE encode"), torch.no_grad():
        vae = loaders.load_vae(src, place)
        for ex, spec, k in todo:
            px = spec.pixels(ex.path)[None].to(place.device, place.vae_dtype)
            dist = vae.encode(px).latent_dist
            store.put(k, {"mean": dist.mean[0].float(), "std": dist.std[0].float()}, metadata={"image": ex.id})
        loaders.free(vae)
        del vae
    return keys


def load_latents(keys: Sequence[str], cache_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (mean, std), fp32 in CPU memory."""
    store = TensorStore(cache_root / "latents")
    out = {}
    for k in dict.fromkeys(keys):
        t = store.get(k)
        out[k] = (t["mean"], t["std"])
    return out
