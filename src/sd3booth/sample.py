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
    seeds: list[int] | None = None,
) -> list[Any]:
    """n PIL images of ``size`` (square side, or (width, height)); image i always comes from seed + i (or
    ``seeds[i]``), whatever the batch size."""
    dtype = pipe.transformer.dtype
    width, height = (size, size) if isinstance(size, int) else size
    seeds = seeds or [seed + i for i in range(n)]
    images = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)

        def rep(t: torch.Tensor, count: int = count) -> torch.Tensor:
            return t[None].expand(count, *t.shape).to(device, dtype)

        generators = [torch.Generator(device=device).manual_seed(seeds[start + i]) for i in range(count)]
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


def generate_with_lora(
    src: Any,
    loras: list[tuple[Path, float]],
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
        loaders.load_for_sampling(src, place), loaders.load_vae(src, place), loaders.load_scheduler(src)
    )
    positive, negative = emb[keys[prompt]], emb[keys[negative_prompt]]
    if loras:
        from sd3booth.adapters.mix import apply_loras

        n, text_lora = apply_loras(pipe, loras, log)
        log(f"applied {len(loras)} adapter file(s), {n} layers, weights {', '.join(f'{w:g}' for _, w in loras)}")
        if text_lora:  # the CLIP part of both prompts through the files' text-encoder LoRA; T5's from the cache
            positive, negative = _encode_with_text_lora(
                src, place, text_lora, (prompt, negative_prompt), (positive, negative)
            )
    autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
    images = generate(
        pipe,
        positive,
        negative,
        num_images,
        seed,
        size,
        steps,
        guidance,
        device,
        autocast_dtype=autocast,
    )
    return save_images(images, out_dir, prefix="image-")


def _encode_with_text_lora(
    src: Any, place: Placement, text_lora: dict[str, Any], prompts: tuple[str, str],
    cached: tuple[TextEmbedding, TextEmbedding],
) -> tuple[TextEmbedding, TextEmbedding]:  # fmt: skip
    from sd3booth.adapters import text_encoder as clip_lora
    from sd3booth.models import loaders

    tokenizers, encoders = [], []
    for index, name in enumerate(clip_lora.NAMES, start=1):
        tok, enc = loaders.load_text_encoder(src, index, place)
        if name in text_lora:
            clip_lora.lora_from_state(enc, text_lora[name])
        tokenizers.append(tok)
        encoders.append(enc)
    text = clip_lora.TextEncoders(encoders, place.device, clip_lora.token_ids(tokenizers, list(prompts)))
    with torch.autocast(place.device.type, dtype=place.text_dtype, enabled=place.text_dtype != torch.float32):
        out = text.embedding(prompts[0], cached[0]), text.embedding(prompts[1], cached[1])
    loaders.free(*encoders)
    return out
