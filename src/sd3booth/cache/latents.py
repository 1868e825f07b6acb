"""Latent cache: the VAE encodes each (image content, resolution, crop, flip) once.

The entry holds the latent distribution's mean and std (not one sample), so training can draw a fresh
sample every step as the un-cached reference does. Keys hash the image bytes, never a position in a
shuffled loop (the diffusers reference's ``--cache_latents`` bug, diffusers #14430).

Without ``center_crop`` the latent of the whole resized image is cached and the trainer crops a random
window in latent space each step (8-pixel granularity), instead of freezing one random crop at start-up.
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
from sd3booth.models import loaders
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource


@dataclass(frozen=True)
class LatentSpec:
    """Everything besides the image bytes that decides a cached latent (a future bucket adds its size)."""

    resolution: int
    center_crop: bool
    flip: bool
    tiled: bool = False  # tiled encoding blends tile seams: slightly different latents, so its own entries


def latent_key(digest: str, spec: LatentSpec, vae_identity: str, vae_numerics: str) -> str:
    """Everything that changes the stored latent: image bytes, size, crop, flip, tiling, VAE and its dtype/device."""
    return content_key(
        kind="latent",
        image=digest,
        res=spec.resolution,
        center_crop=spec.center_crop,
        flip=spec.flip,
        tiled=spec.tiled,
        vae=vae_identity,
        numerics=vae_numerics,
    )


def ensure_latents(
    examples: Sequence[dataset.Example],
    specs: Sequence[LatentSpec],
    src: ModelSource,
    place: Placement,
    cache_root: Path,
    log: Callable[[str], None] = print,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> dict[tuple[str, bool], str]:
    """Makes sure every (example, spec) latent is on disk; returns (example uid, flip) -> cache key.

    The VAE is loaded only if something is missing, and freed before returning.
    """
    store = TensorStore(cache_root / "latents")
    store.clean_temporaries()  # left by a run killed mid-write
    vae_id = src.identity("vae")
    numerics = f"{str(place.vae_dtype).removeprefix('torch.')}@{place.device.type}"
    channels = json.loads((src.root / "vae" / "config.json").read_text(encoding="utf-8")).get("latent_channels")
    keys: dict[tuple[str, bool], str] = {}
    todo: list[tuple[dataset.Example, LatentSpec, str]] = []
    for ex in examples:
        digest = dataset.file_digest(ex.path)
        for spec in specs:
            k = latent_key(digest, spec, vae_id, numerics)
            keys[(ex.uid, spec.flip)] = k
            if not store.usable(k, {"mean": (channels, None, None), "std": (channels, None, None)}):
                todo.append((ex, spec, k))
    if not todo:
        return keys
    log(f"encoding {len(todo)} latent(s) ({len(keys) - len(todo)} cached)")
    with stage("VAE encode"), torch.no_grad():
        vae = loaders.load_vae(src, place)
        for ex, spec, k in todo:
            img = dataset.resize_and_crop(dataset.load_image(ex.path), spec.resolution, spec.center_crop)
            px = dataset.to_tensor(img, flip=spec.flip)[None].to(place.device, place.vae_dtype)
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
