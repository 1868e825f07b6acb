"""Validation images during and after training, from cached prompt embeddings (no text encoder loaded)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from sd3booth import sample
from sd3booth.cache.text import TextEmbedding
from sd3booth.models import loaders, speed
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource


class Validator:
    """Samples the validation prompts with the training transformer; the VAE waits on the CPU in between."""

    def __init__(
        self,
        src: ModelSource,
        place: Placement,
        out_dir: Path,
        prompts: list[TextEmbedding],
        negative: TextEmbedding,
        num_images: int,
        seed: int,
        size: tuple[int, int],
        steps: int,
        guidance: float,
        attention_backend: str,
    ) -> None:
        self.src, self.place, self.out_dir = src, place, out_dir
        self.prompts, self.negative = prompts, negative
        self.num_images, self.seed, self.size = num_images, seed, size
        self.steps, self.guidance, self.attention_backend = steps, guidance, attention_backend
        self.vae: Any = None
        self.folders: list[Path] = []

    def __call__(self, net: Any, step: int, compiled: speed.CompiledBlocks | None = None) -> list[Any]:
        """Writes validation/step-N/*.png (``NNN.png`` for one prompt, ``pP-NNN.png`` for several) and returns
        the images; ``net`` is back in train mode after."""
        place = self.place
        vae = self.vae or loaders.load_vae(self.src, place)
        vae.to(place.device)
        net.eval()
        pipe = sample.make_pipeline(net, vae, loaders.load_scheduler(self.src))
        autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
        eager = compiled.eager() if compiled else contextlib.nullcontext()
        folder = self.out_dir / "validation" / f"step-{step}"
        images = []
        with eager, speed.attention_context(place.device, self.attention_backend):
            for j, prompt in enumerate(self.prompts):
                some = sample.generate(
                    pipe, prompt, self.negative, self.num_images, self.seed, self.size, self.steps, self.guidance,
                    place.device, autocast_dtype=autocast,
                )  # fmt: skip
                sample.save_images(some, folder, prefix=f"p{j}-" if len(self.prompts) > 1 else "")
                images += some
        self.folders.append(folder)
        net.train()
        self.vae = vae.to("cpu")  # kept on the CPU between validations, off the GPU
        del pipe
        loaders.free()
        return images
