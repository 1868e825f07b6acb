"""The caching stages of a run, in data-flow order: scan data -> text embeddings -> class images -> latents.

Each stage reads and writes content-keyed files only (see ``store``); ``Prepared`` is the index the
trainer receives: which cache key holds each example's caption embedding and latents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd3booth import sample
from sd3booth.cache import latents as cache_latents
from sd3booth.cache import masks as cache_masks
from sd3booth.cache import text as cache_text
from sd3booth.cache.store import clean_temporaries, tmp_prefix
from sd3booth.config import TrainConfig
from sd3booth.config.datasets import read_dataset_config
from sd3booth.data import concepts as concepts_
from sd3booth.data import dataset
from sd3booth.data.buckets import BucketSettings, Size, batch_shapes, image_size, upscale_warning
from sd3booth.data.masks import find_masks
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
    latent_keys: dict[tuple[str, Size, bool], str]  # (example uid, training size, flipped) -> key
    negative_key: str  # the empty prompt: classifier-free guidance and caption dropout
    validation_keys: list[str]  # of validation_prompts, in order
    shift_factor: float
    scaling_factor: float
    concepts: list[concepts_.Concept] = field(default_factory=list)
    items: list[concepts_.Item] = field(default_factory=list)  # one epoch, see data.concepts
    mask_keys: dict[tuple[str, Size], str] = field(default_factory=dict)  # (uid, size) -> key; --masked_loss
    buckets_on: bool = False
    validation_prompts: list[str] = field(default_factory=list)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Warnings go to stderr once per run (the data is scanned by verify, then again)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)


def new_run() -> None:
    """Forget the warnings given: a new run in this process warns again."""
    _WARNED.clear()


def run_concepts(cfg: TrainConfig) -> list[concepts_.Concept]:
    """The run's concepts: the --dataset_config entries over the flags, or the flags as one entry."""
    prior = cfg.class_images  # --prior_preservation_mode base_model uses the class prompt and no class images
    default = concepts_.Concept(
        instance_data_dir=cfg.data_dir or "",
        instance_prompt=cfg.instance_prompt,
        repeats=cfg.repeats,
        resolution=cfg.resolution,
        class_data_dir=cfg.class_data_dir if prior else None,
        class_prompt=cfg.class_prompt,
        num_class_images=cfg.num_class_images,
        prior_loss_weight=cfg.prior_loss_weight,
        mask_dir=cfg.mask_dir,
    )
    if not cfg.dataset_config:
        return [default]
    entries = read_dataset_config(cfg.dataset_config)
    return concepts_.concepts_from_entries(entries, default, prior, cfg.dataset_config)


def bucket_settings(cfg: TrainConfig, src: ModelSource) -> BucketSettings:
    """The bucket flags, with the default longest side capped to what the model's position embedding takes."""
    largest, _ = source.resolution_limits(src)
    return BucketSettings(cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, largest)


def train_size(cfg: TrainConfig, src: ModelSource) -> Size:
    """The largest training size of the run (the memory plan plans for its token count)."""
    return concepts_.largest_size(run_concepts(cfg), cfg.enable_bucket, bucket_settings(cfg, src))


# Measurement override of the count below ("1": plan as for square training), for tools/gpu_buckets.sh's recheck
PLAN_SHAPES_ENV = "SD3BOOTH_PLAN_SHAPES"


def batch_shape_count(cfg: TrainConfig, src: ModelSource) -> int:
    """How many distinct batch shapes (training size x items in the batch) the run's data gives, before any
    model loads: the memory plan keeps headroom for each beyond the first. Image headers only; the class images
    are counted as they will be (``num_class_images`` per prior concept)."""
    if forced := os.environ.get(PLAN_SHAPES_ENV):
        return max(1, int(forced))
    concepts = run_concepts(cfg)
    instances = scan_data(cfg, lambda m: None)
    sizes, _, _ = concepts_.training_sizes(instances, concepts, cfg.enable_bucket, bucket_settings(cfg, src))
    counts = Counter(concepts_.epoch_item_sizes(instances, concepts, sizes))
    return len(batch_shapes(counts, cfg.train_batch_size))


def _outputs(cfg: TrainConfig) -> dict[str, Path]:
    out = {"--output_dir": Path(cfg.output_dir)}
    if cfg.cache_dir:
        out["--cache_dir"] = Path(cfg.cache_dir)
    return out


def scan_data(
    cfg: TrainConfig, log: Callable[[str], None], warn: Callable[[str], None] | None = None
) -> list[dataset.Example]:
    """Instance examples of every concept (--instance_data_dir, a --dataset_name folder or hub dataset, or the
    --dataset_config entries); refuses output folders inside data folders and checks every mask."""
    concepts = run_concepts(cfg)
    concepts_.check_outputs_outside(_outputs(cfg), concepts)
    first = None
    if cfg.dataset_name and not Path(cfg.dataset_name).exists():
        first = _materialize_hub_dataset(cfg, log)
    examples = concepts_.scan_concepts(
        concepts, first, cfg.caption_column, cfg.image_column or "file_name", list(_outputs(cfg).values()),
        warn or _warn_once,
    )  # fmt: skip
    items = sum(sum(ex.concept == k for ex in examples) * c.repeats for k, c in enumerate(concepts))
    if items < cfg.train_batch_size:
        where = cfg.dataset_config or Path(cfg.data_dir or "").expanduser().resolve()
        raise UserError(
            f"{where} has {len(examples)} usable image(s) x --repeats {cfg.repeats}, fewer than one batch "
            f"(--train_batch_size {cfg.train_batch_size}); add images, raise --repeats or lower --train_batch_size"
        )
    if cfg.masked_loss:
        mask_files(cfg, concepts, examples)
    return examples


def mask_files(
    cfg: TrainConfig, concepts: list[concepts_.Concept], examples: list[dataset.Example]
) -> dict[str, tuple[Path, bool]]:
    """uid -> (file the mask is read from, read its alpha?) for every instance image under --masked_loss."""
    out: dict[str, tuple[Path, bool]] = {}
    for k, concept in enumerate(concepts):
        if not concept.mask_dir and not cfg.alpha_mask:
            raise UserError(
                f"--masked_loss: {cfg.dataset_config} [[datasets]] entry {k + 1} has no mask_dir and "
                "--alpha_mask is off; add mask_dir to the entry, or pass --alpha_mask"
            )
        mine = [ex for ex in examples if ex.concept == k]
        mask_dir = Path(concept.mask_dir).expanduser() if concept.mask_dir else None
        if mask_dir is not None and not mask_dir.is_dir():
            raise UserError(f"--mask_dir {mask_dir} is not a folder; point it at the folder of masks")
        sizes = {ex.uid: image_size(ex.path) for ex in mine}
        out.update({u: (p, mask_dir is None) for u, p in find_masks(mine, mask_dir, sizes).items()})
    return out


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


@dataclass(frozen=True)
class ClassJob:
    """The class images one concept lacks: how many it has, and the size of each missing one in order."""

    concept: concepts_.Concept
    have: int
    sizes: list[Size]


def generate_class_images(
    jobs: list[ClassJob], cfg: TrainConfig, src: ModelSource, place: Placement, text_keys: dict[str, str],
    log: Callable[[str], None],
) -> None:  # fmt: skip
    """Generates the missing class images with the base model (loaded once) and keeps them in each concept's
    class folder. Each image is drawn at the training size of the instance image it will be paired with."""
    prompts = [text_keys[j.concept.class_prompt or ""] for j in jobs]
    for job in jobs:
        clean_temporaries(Path(job.concept.class_data_dir or ""))  # of a generation killed last time
    emb = cache_text.load_text_embeddings([*prompts, text_keys[NEGATIVE_PROMPT]], cfg.cache_path, torch.float32)
    transformer = loaders.load_for_sampling(src, place)
    vae = loaders.load_vae(src, place)
    pipe = sample.make_pipeline(transformer, vae, loaders.load_scheduler(src))
    autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
    for job, prompt_key in zip(jobs, prompts):
        c = job.concept
        folder = Path(c.class_data_dir or "")
        log(f"generating {len(job.sizes)} class image(s) for '{c.class_prompt}'")
        tag = hashlib.sha256(f"{c.class_prompt}|{src.identity('transformer')}".encode()).hexdigest()[:8]
        base = (cfg.seed or 0) + 10_000 * job.have
        by_size: dict[Size, list[int]] = {}
        for q, size in enumerate(job.sizes):
            by_size.setdefault(size, []).append(q)
        for size, positions in by_size.items():
            for start in range(0, len(positions), cfg.sample_batch_size):
                chunk = positions[start : start + cfg.sample_batch_size]
                images = sample.generate(
                    pipe, emb[prompt_key], emb[text_keys[NEGATIVE_PROMPT]], len(chunk), base, size,
                    cfg.num_inference_steps, cfg.guidance_scale, place.device, batch_size=len(chunk),
                    autocast_dtype=autocast, seeds=[base + q for q in chunk],
                )  # fmt: skip
                for q, img in zip(chunk, images):  # written whole, then renamed: a killed run leaves no half image
                    name = f"class-{tag}-{job.have + q:05d}.png"
                    tmp = folder / f"{tmp_prefix(name)}0.tmp"
                    img.save(tmp, format="PNG")
                    os.replace(tmp, folder / name)
    loaders.free(transformer, vae)
    del pipe, transformer, vae


def validation_prompts(cfg: TrainConfig) -> list[str]:
    """--validation_prompt (each one given) then the lines of --validation_prompt_file."""
    extra = concepts_.read_prompt_file(cfg.validation_prompt_file) if cfg.validation_prompt_file else []
    return list(dict.fromkeys([*cfg.validation_prompts, *extra]))


def _class_images(
    cfg: TrainConfig, concepts: list[concepts_.Concept], instances: list[dataset.Example], sizes: dict[str, Size],
    src: ModelSource, place: Placement, text_keys: dict[str, str], log: Callable[[str], None],
    stage: Callable[[str], AbstractContextManager],
) -> list[dataset.Example]:  # fmt: skip
    """Every prior concept's class images (the missing ones generated first), in concept order."""
    exclude = list(_outputs(cfg).values())
    jobs = []
    for k, c in enumerate(concepts):
        have = len(concepts_.scan_classes(c, k, exclude)) if c.prior else c.num_class_images
        if have < c.num_class_images:
            mine = [sizes[ex.uid] for ex in instances if ex.concept == k]
            jobs.append(ClassJob(c, have, concepts_.class_position_sizes(mine, c.repeats, c.num_class_images)[have:]))
    if jobs:
        with stage("class images"):
            generate_class_images(jobs, cfg, src, place, text_keys, log)
    classes: list[dataset.Example] = []
    for k, c in enumerate(concepts):
        classes += concepts_.scan_classes(c, k, exclude)[: c.num_class_images] if c.prior else []
    return classes


def _latent_jobs(
    cfg: TrainConfig, prep: Prepared, sizes: dict[str, Size], tiled: bool
) -> list[tuple[dataset.Example, cache_latents.LatentSpec]]:
    """(example, spec) of every latent the epoch uses: each instance at its size, each class image at the size
    of every instance it is paired with; both flips with --random_flip."""
    flips = (False, True) if cfg.random_flip else (False,)

    def spec(ex: dataset.Example, size: Size, flip: bool) -> cache_latents.LatentSpec:
        bucket = size if prep.buckets_on else None
        return cache_latents.LatentSpec(prep.concepts[ex.concept].resolution, cfg.center_crop, flip, tiled, bucket)

    jobs = [(ex, spec(ex, sizes[ex.uid], f)) for ex in prep.instances for f in flips]
    paired = sorted({(it.cls, it.size) for it in prep.items if it.cls is not None})
    return jobs + [(prep.classes[j], spec(prep.classes[j], size, f)) for j, size in paired for f in flips]


def prepare(
    cfg: TrainConfig,
    place: Placement,
    log: Callable[[str], None] = print,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> Prepared:
    """Runs every caching stage that is not already cached; returns the index for the trainer."""
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    concepts = run_concepts(cfg)
    instances = scan_data(cfg, log)
    sizes, on, scales = concepts_.training_sizes(instances, concepts, cfg.enable_bucket, bucket_settings(cfg, src))
    if warning := upscale_warning({str(ex.path): scales[ex.uid] for ex in instances}):
        _warn_once(warning)
    validation = validation_prompts(cfg)
    captions = [ex.caption for ex in instances] + [NEGATIVE_PROMPT]
    captions += [c.class_prompt or "" for c in concepts if c.prior] + validation
    captions += [cfg.class_prompt or ""] if cfg.base_model_prior else []
    if warning := cache_text.long_caption_warning(captions, src, cfg.max_sequence_length):
        _warn_once(warning)
    text_keys = cache_text.ensure_text_embeddings(
        captions, src, place, cfg.cache_path, cfg.max_sequence_length, log, stage
    )
    classes = _class_images(cfg, concepts, instances, sizes, src, place, text_keys, log, stage)
    shift, scale = loaders.vae_latent_params(src)
    prep = Prepared(
        src, instances, classes, text_keys, {}, text_keys[NEGATIVE_PROMPT], [text_keys[v] for v in validation],
        shift, scale, concepts, concepts_.pair_items(instances, classes, concepts, sizes), buckets_on=on,
    )  # fmt: skip
    jobs = _latent_jobs(cfg, prep, sizes, place.memory.vae_tiling)
    prep.latent_keys = cache_latents.ensure_latents(jobs, src, place, cfg.cache_path, log, stage)
    prep.validation_prompts = validation
    if cfg.masked_loss:
        files = mask_files(cfg, concepts, instances)
        mask_jobs = [(ex, *files[ex.uid], sp) for ex, sp in jobs if not ex.is_class and not sp.flip]
        prep.mask_keys = cache_masks.ensure_masks(mask_jobs, cfg.cache_path, log)
    log(concepts_.describe_buckets(prep.items, instances, on, cfg.bucket_reso_steps))
    return prep


def prepare_command(cfg: TrainConfig, log: Callable[[str], None] = print) -> Prepared:
    """``sd3booth prepare``: only the caching stages, on the first GPU (or the CPU)."""
    from sd3booth.tracking import Stages

    source.quiet_libraries()
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    # the same decision as `train`, for the largest training size
    place = placement.place_run(
        cfg, src.root, placement.detect_device(), train_size=train_size(cfg, src), shapes=batch_shape_count(cfg, src)
    )
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
