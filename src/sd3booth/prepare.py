"""The caching stages of a run, in data-flow order: scan data -> text embeddings -> class images -> latents.

Each stage reads and writes content-keyed files only (see ``store``); ``Prepared`` is the index the
trainer receives: which cache key holds each example's caption embedding and latents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sd3booth import sample
from sd3booth.cache import latents as cache_latents
from sd3booth.cache import text as cache_text
from sd3booth.cache.store import clean_temporaries, tmp_prefix
from sd3booth.config import TrainConfig
from sd3booth.data import dataset
from sd3booth.errors import UserError
from sd3booth.models import loaders, placement, source
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource

NEGATIVE_PROMPT = ""  # what the pipeline encodes for classifier-free guidance when no negative prompt is given


@dataclass
class Prepared:
    src: ModelSource
    instances: list[dataset.Example]
    classes: list[dataset.Example]
    text_keys: dict[str, str]  # caption -> key
    latent_keys: dict[tuple[str, bool], str]  # (example uid, flipped) -> key
    negative_key: str
    validation_key: str | None
    shift_factor: float
    scaling_factor: float


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Skipped-file warnings go to stderr once per process (the data is scanned by verify, then again)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)


def scan_data(
    cfg: TrainConfig, log: Callable[[str], None], warn: Callable[[str], None] | None = None
) -> list[dataset.Example]:
    """Instance examples from --instance_data_dir or --dataset_name (a local folder, or a hub dataset)."""
    root = Path(cfg.data_dir or "")
    if cfg.dataset_name and not root.exists():
        root = _materialize_hub_dataset(cfg, log)
    examples = dataset.scan_images(
        root,
        caption_column=cfg.caption_column,
        image_column=cfg.image_column or "file_name",
        instance_prompt=cfg.instance_prompt,
        warn=warn or _warn_once,
    )
    if len(examples) * cfg.repeats < cfg.train_batch_size:
        raise UserError(
            f"{root} has {len(examples)} usable image(s) x --repeats {cfg.repeats}, fewer than one batch "
            f"(--train_batch_size {cfg.train_batch_size}); add images, raise --repeats or lower --train_batch_size"
        )
    return examples


def _materialize_hub_dataset(cfg: TrainConfig, log: Callable[[str], None]) -> Path:
    """Writes a hub dataset once into the cache as an image folder with metadata.jsonl."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(
            f"--dataset_name {cfg.dataset_name} is not a local folder and the 'datasets' package is missing; "
            "pip install datasets, or pass a local folder"
        ) from None
    name = cfg.dataset_name or ""
    tag = f"{name}@{cfg.revision}" + (f"/{cfg.dataset_config_name}" if cfg.dataset_config_name else "")
    out = cfg.cache_path / "datasets" / hashlib.sha256(tag.encode()).hexdigest()[:16]
    if (out / dataset.METADATA_FILE).is_file():
        return out
    try:
        ds = load_dataset(name, cfg.dataset_config_name, split="train")
    except Exception as e:  # noqa: BLE001 - any loading failure means the same to the user
        raise UserError(f"could not load dataset {name} ({type(e).__name__}); check the id and network") from None
    image_col = cfg.image_column or "image"
    for col in (image_col, cfg.caption_column):
        if col not in ds.column_names:
            raise UserError(f"dataset {name} has no column '{col}' (columns: {', '.join(ds.column_names)})")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(ds):
        fname = f"{i:05d}.png"
        row[image_col].convert("RGB").save(out / fname)
        lines.append(json.dumps({"file_name": fname, "caption": str(row[cfg.caption_column])}))
    (out / dataset.METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"dataset {name}: {len(lines)} images written to {out}")
    return out


def generate_class_images(
    cfg: TrainConfig,
    src: ModelSource,
    place: Placement,
    have: int,
    prompt_key: str,
    negative_key: str,
    log: Callable[[str], None],
) -> None:
    """Generates the missing class images with the base model and keeps them in --class_data_dir."""
    missing = cfg.num_class_images - have
    clean_temporaries(Path(cfg.class_data_dir or ""))  # of a generation killed last time
    log(f"generating {missing} class image(s) for '{cfg.class_prompt}'")
    emb = cache_text.load_text_embeddings([prompt_key, negative_key], cfg.cache_path, torch.float32)
    transformer = loaders.load_transformer(src, place)
    vae = loaders.load_vae(src, place)
    pipe = sample.make_pipeline(transformer, vae, loaders.load_scheduler(src))
    folder = Path(cfg.class_data_dir or "")
    tag = hashlib.sha256(f"{cfg.class_prompt}|{src.identity('transformer')}".encode()).hexdigest()[:8]
    seed = (cfg.seed or 0) + 10_000 * have
    autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
    for start in range(0, missing, cfg.sample_batch_size):
        count = min(cfg.sample_batch_size, missing - start)
        images = sample.generate(
            pipe,
            emb[prompt_key],
            emb[negative_key],
            count,
            seed + start,
            cfg.resolution,
            cfg.num_inference_steps,
            cfg.guidance_scale,
            place.device,
            batch_size=count,
            autocast_dtype=autocast,
        )
        for i, img in enumerate(images):  # written whole, then renamed: a killed run leaves no half image
            name = f"class-{tag}-{have + start + i:05d}.png"
            tmp = folder / f"{tmp_prefix(name)}0.tmp"
            img.save(tmp, format="PNG")
            os.replace(tmp, folder / name)
    loaders.free(transformer, vae)
    del pipe, transformer, vae


def prepare(
    cfg: TrainConfig,
    place: Placement,
    log: Callable[[str], None] = print,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> Prepared:
    """Runs every caching stage that is not already cached; returns the index for the trainer."""
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    instances = scan_data(cfg, log)
    classes: list[dataset.Example] = []
    captions = [ex.caption for ex in instances] + [NEGATIVE_PROMPT]
    if cfg.with_prior_preservation:
        captions.append(cfg.class_prompt or "")
    if cfg.validation_prompt:
        captions.append(cfg.validation_prompt)
    text_keys = cache_text.ensure_text_embeddings(
        captions, src, place, cfg.cache_path, cfg.max_sequence_length, log, stage
    )
    if cfg.class_images:  # --prior_preservation_mode base_model needs the class prompt's embedding only
        classes = dataset.scan_class_images(Path(cfg.class_data_dir or ""), cfg.class_prompt or "")
        if len(classes) < cfg.num_class_images:
            with stage("class images"):
                generate_class_images(
                    cfg, src, place, len(classes), text_keys[cfg.class_prompt or ""], text_keys[NEGATIVE_PROMPT], log
                )
            classes = dataset.scan_class_images(Path(cfg.class_data_dir or ""), cfg.class_prompt or "")
        classes = classes[: cfg.num_class_images]
    flips = (False, True) if cfg.random_flip else (False,)
    specs = [cache_latents.LatentSpec(cfg.resolution, cfg.center_crop, f, place.memory.vae_tiling) for f in flips]
    latent_keys = cache_latents.ensure_latents(instances + classes, specs, src, place, cfg.cache_path, log, stage)
    shift, scale = loaders.vae_latent_params(src)
    return Prepared(
        src=src,
        instances=instances,
        classes=classes,
        text_keys=text_keys,
        latent_keys=latent_keys,
        negative_key=text_keys[NEGATIVE_PROMPT],
        validation_key=text_keys[cfg.validation_prompt] if cfg.validation_prompt else None,
        shift_factor=shift,
        scaling_factor=scale,
    )


def prepare_command(cfg: TrainConfig, log: Callable[[str], None] = print) -> Prepared:
    """``sd3booth prepare``: only the caching stages, on the first GPU (or the CPU)."""
    from sd3booth.tracking import Stages

    source.quiet_libraries()
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    place = placement.place_run(cfg, src.root, placement.detect_device())  # the same decision as `train`
    stages = Stages(place.device)
    try:
        prep = prepare(cfg, place, log, stages.stage)
    finally:
        stages.close()
    log(
        f"cached: {len(prep.text_keys)} caption embedding(s), {len(prep.latent_keys)} latent(s), "
        f"{len(prep.classes)} class image(s) in {cfg.cache_path}"
    )
    if stages.records:
        log(stages.table())
    return prep
