"""Image generation from cached text embeddings: validation images, class images, ``generate``.

The pipeline is assembled from the components already in memory with no text encoder at all
(embeddings come from the cache), so sampling inside the training process costs the VAE only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sd3booth.cache.text import TextEmbedding
from sd3booth.models.placement import Placement


def make_pipeline(transformer: Any, vae: Any, scheduler: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: Any,
    prompt: TextEmbedding,
    negative: TextEmbedding,
    n: int,
    seed: int,
    size: int | tuple[int, int],
    steps: int,
    guidance: float,
    device: torch.device,
    batch_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> list[Any]:
    """n PIL images of ``size`` (square) or (height, width); image i always comes from seed + i, whatever the
    batch size."""
    height, width = (size, size) if isinstance(size, int) else size
    dtype = pipe.transformer.dtype
    images = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)

        def rep(t: torch.Tensor, count: int = count) -> torch.Tensor:
            return t[None].expand(count, *t.shape).to(device, dtype)

        generators = [torch.Generator(device=device).manual_seed(seed + start + i) for i in range(count)]
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype
            else torch.autocast(device.type, enabled=False)
        )
        with ctx:
            out = pipe(
                prompt_embeds=rep(prompt.prompt_embeds),
                pooled_prompt_embeds=rep(prompt.pooled),
                negative_prompt_embeds=rep(negative.prompt_embeds),
                negative_pooled_prompt_embeds=rep(negative.pooled),
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=generators,
            )
        images.extend(out.images)
    return images


def save_images(images: list[Any], folder: Path, prefix: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{prefix}{i:03d}.png"
        img.save(p)
        paths.append(p)
    return paths


def apply_loras(pipe: Any, loras: list[tuple[Any, float]], log: Any = print) -> int:
    """Loads each (LoraFile, weight) into the pipeline's transformer as its own adapter, then sets the weights.

    Every layer of every file is checked against this transformer first (name and shape), and the adapters are
    counted afterwards, so a LoRA that fits nothing is an error, never a silent no-op (diffusers only logs).
    Returns the number of LoRA layers applied.
    """
    from sd3booth.adapters import formats
    from sd3booth.errors import UserError

    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    names, weights, applied = [], [], 0
    for i, (lf, weight) in enumerate(loras):
        layers = {k: v for k, v in lf.modules.items() if k.startswith("transformer.")}
        if len(layers) < len(lf.modules):
            log(
                f"note: {lf.path.name}: {len(lf.modules) - len(layers)} text-encoder layer(s) not applied (prompts "
                "come from the text cache, encoded without LoRA)"
            )
        bad = [
            k for k, (d, u) in layers.items()
            if k.removeprefix("transformer.") not in linears
            or tuple(linears[k.removeprefix("transformer.")].weight.shape) != (u.shape[0], d.shape[1])
        ]  # fmt: skip
        if bad or not layers:
            raise UserError(
                f"--lora {lf.path}: {len(bad)} of its {len(layers)} transformer layers do not fit this model "
                f"(e.g. {(bad or list(lf.modules))[0]}); is it a LoRA for another SD3 model?"
            )
        name = f"lora{i}"
        pipe.load_lora_weights(formats.to_state_dict(layers, "diffusers"), adapter_name=name)
        found = sum(1 for _n, m in pipe.transformer.named_modules() if name in (getattr(m, "lora_A", None) or {}))
        if found != len(layers):
            raise UserError(f"--lora {lf.path}: only {found} of its {len(layers)} layers were applied")
        names.append(name)
        weights.append(weight)
        applied += found
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return applied


def generate_with_lora(
    src: Any,
    loras: list[tuple[Any, float]],
    prompt: str,
    negative_prompt: str,
    out_dir: Path,
    num_images: int,
    seed: int,
    steps: int,
    guidance: float,
    size: tuple[int, int],
    max_sequence_length: int,
    place: Placement,
    cache_dir: Path,
    log: Any = print,
) -> list[Path]:
    """``sd3booth generate``: encode the prompts through the text cache, then sample base model + LoRAs."""
    from sd3booth.cache import text as cache_text
    from sd3booth.models import loaders, source

    source.quiet_libraries()
    device = place.device
    keys = cache_text.ensure_text_embeddings([prompt, negative_prompt], src, place, cache_dir, max_sequence_length, log)
    emb = cache_text.load_text_embeddings(keys.values(), cache_dir, place.weight_dtype)
    pipe = make_pipeline(
        loaders.load_transformer(src, place), loaders.load_vae(src, place), loaders.load_scheduler(src)
    )
    if loras:
        n = apply_loras(pipe, loras, log)
        log(f"applied {len(loras)} LoRA(s), {n} layers, weights {', '.join(f'{w:g}' for _, w in loras)}")
    autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
    images = generate(
        pipe,
        emb[keys[prompt]],
        emb[keys[negative_prompt]],
        num_images,
        seed,
        size,
        steps,
        guidance,
        device,
        autocast_dtype=autocast,
    )
    return save_images(images, out_dir, prefix="image-")
