"""Several concepts in one run: each concept's folders and settings, the scan of all of them, the size each
image trains at, and the epoch's items (instance image, paired class image, training size).

Items follow diffusers' ``train_dreambooth_lora_sd3.py``: with prior preservation a concept contributes
max(#instance x repeats, #class) items per epoch and item i pairs instance image i mod #instance with class
image i mod #class. A class image trains at the size of the instance image it is paired with, so a batch
(which holds one training size) always stacks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sd3booth.data import buckets as bk
from sd3booth.data.dataset import Example, scan_class_images, scan_images
from sd3booth.errors import UserError


@dataclass(frozen=True)
class Concept:
    """One ``[[datasets]]`` entry (or the flags): where its images are and how it trains."""

    instance_data_dir: str
    instance_prompt: str | None = None
    repeats: int = 1
    resolution: int = 512
    class_data_dir: str | None = None  # set only when this concept has prior preservation
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    mask_dir: str | None = None

    @property
    def prior(self) -> bool:
        return self.class_data_dir is not None


@dataclass(frozen=True)
class Item:
    """One element of an epoch: an instance image, its paired class image (or None) and its training size."""

    instance: int  # index into the run's instance examples
    cls: int | None  # index into the run's class examples
    size: bk.Size  # (width, height) of the training crop in pixels
    concept: int


def concepts_from_entries(
    entries: Sequence[dict[str, Any]], default: Concept, prior: bool, source: str
) -> list[Concept]:
    """The concepts of a dataset config: each entry over the flags' values (``default``).

    An entry's class folder means prior preservation for that concept, so it needs --with_prior_preservation.
    """
    out = []
    for number, entry in enumerate(entries, start=1):
        where = f"{source} [[datasets]] entry {number}"
        if entry.get("class_data_dir") and not prior:
            raise UserError(
                f"{where} has a class_data_dir but no class images are used; add --with_prior_preservation "
                "(with --prior_preservation_mode class_images)"
            )
        concept = replace(default, **entry)
        if concept.prior and not concept.class_prompt:
            raise UserError(f"{where} has a class folder but no class_prompt; add class_prompt = 'a photo of a ...'")
        out.append(concept)
    if prior and not any(c.prior for c in out):
        raise UserError(f"--with_prior_preservation: no entry of {source} has a class_data_dir; add one")
    return out


def check_outputs_outside(outputs: dict[str, Path], concepts: Sequence[Concept]) -> None:
    """An output folder inside (or equal to) a data folder would be read back as training data: refused."""
    for concept in concepts:
        for flag, folder in (
            ("--instance_data_dir", concept.instance_data_dir),
            ("--class_data_dir", concept.class_data_dir),
        ):
            if not folder:
                continue
            data = Path(folder).expanduser().resolve()
            for out_flag, out in outputs.items():
                target = out.expanduser().resolve()
                if target == data or data in target.parents:
                    raise UserError(
                        f"{out_flag} {out} is inside {flag} {folder}: the next run would train on this run's "
                        f"files; choose a {out_flag} outside the data folders"
                    )


def scan_concepts(
    concepts: Sequence[Concept],
    first_root: Path | None,
    caption_column: str,
    image_column: str,
    exclude: Sequence[Path],
    warn: Callable[[str], None],
) -> list[Example]:
    """The instance images of every concept, in concept order. ``first_root`` replaces the first concept's
    folder (a hub dataset written to the cache). Class and mask folders are never scanned as instances."""
    others = [Path(p).expanduser() for c in concepts for p in (c.class_data_dir, c.mask_dir) if p]
    examples: list[Example] = []
    for k, concept in enumerate(concepts):
        root = first_root if (k == 0 and first_root is not None) else Path(concept.instance_data_dir)
        examples += scan_images(
            root,
            caption_column=caption_column,
            image_column=image_column,
            instance_prompt=concept.instance_prompt,
            warn=warn,
            exclude=[*exclude, *others],
            concept=k,
        )
    return examples


def scan_classes(concept: Concept, k: int, exclude: Sequence[Path]) -> list[Example]:
    return scan_class_images(Path(concept.class_data_dir or ""), concept.class_prompt or "", k, exclude)


def training_sizes(
    examples: Sequence[Example], concepts: Sequence[Concept], enable: bool | None, settings: bk.BucketSettings
) -> tuple[dict[str, bk.Size], bool, dict[str, float]]:
    """(uid -> training size, buckets on?, uid -> enlargement) of every instance image.

    ``enable`` None turns buckets on unless every image would go to the square bucket anyway.
    """
    image_sizes = {ex.uid: bk.image_size(ex.path) for ex in examples}
    tables = {c.resolution: bk.bucket_sizes(c.resolution, settings) for c in concepts}
    if enable is None:
        enable = any(
            bk.buckets_needed([image_sizes[ex.uid]], tables[concepts[ex.concept].resolution], settings.step)
            for ex in examples
        )
    sizes: dict[str, bk.Size] = {}
    scales: dict[str, float] = {}
    for ex in examples:
        res = concepts[ex.concept].resolution
        if enable:
            sizes[ex.uid] = bk.nearest_bucket(image_sizes[ex.uid], tables[res], settings.step)
            scales[ex.uid] = bk.cover_scale(image_sizes[ex.uid], sizes[ex.uid])
        else:
            sizes[ex.uid] = (res, res)
            scales[ex.uid] = bk.square_scale(image_sizes[ex.uid], res)
    return sizes, enable, scales


def largest_size(concepts: Sequence[Concept], enable: bool | None, settings: bk.BucketSettings) -> bk.Size:
    """The training size with the most pixels any image of these concepts can get (what the memory plan
    plans for): the largest bucket, or the largest square when buckets are off."""
    if enable is False:
        res = max(c.resolution for c in concepts)
        return res, res
    candidates = [s for c in concepts for s in bk.bucket_sizes(c.resolution, settings)]
    candidates += [(c.resolution, c.resolution) for c in concepts if enable is None]  # auto may stay square
    return max(candidates, key=lambda s: (s[0] * s[1], -abs(s[0] - s[1])))  # ties: the squarest


def pair_items(
    instances: Sequence[Example],
    classes: Sequence[Example],
    concepts: Sequence[Concept],
    sizes: dict[str, bk.Size],
) -> list[Item]:
    """The items of one epoch, concept by concept (see the module docstring)."""
    items: list[Item] = []
    for k, concept in enumerate(concepts):
        inst = [i for i, ex in enumerate(instances) if ex.concept == k]
        cls = [i for i, ex in enumerate(classes) if ex.concept == k] if concept.prior else []
        for a, b in _pairs(len(inst), concept.repeats, len(cls)):
            j = inst[a]
            items.append(Item(j, cls[b] if b is not None else None, sizes[instances[j].uid], k))
    return items


def _pairs(n_inst: int, repeats: int, n_cls: int) -> list[tuple[int, int | None]]:
    """(instance, class) positions, within the concept's own lists, of a concept's items in one epoch."""
    n = n_inst * repeats
    return [((i % n) // repeats, i % n_cls if n_cls else None) for i in range(max(n, n_cls))]


def epoch_item_sizes(
    instances: Sequence[Example], concepts: Sequence[Concept], sizes: dict[str, bk.Size]
) -> list[bk.Size]:
    """The training size of each item of one epoch, before the class images exist: as :func:`pair_items` will
    pair them once each prior concept has its ``num_class_images`` (generated when missing)."""
    out: list[bk.Size] = []
    for k, concept in enumerate(concepts):
        inst = [ex for ex in instances if ex.concept == k]
        n_cls = concept.num_class_images if concept.prior else 0
        out += [sizes[inst[a].uid] for a, _ in _pairs(len(inst), concept.repeats, n_cls)]
    return out


def class_position_sizes(instance_sizes: Sequence[bk.Size], repeats: int, count: int) -> list[bk.Size]:
    """The training size of class image j (of ``count``): that of instance (j mod #instance x repeats) / repeats,
    the first instance it is paired with in :func:`pair_items`."""
    n = len(instance_sizes) * repeats
    return [instance_sizes[(j % n) // repeats] for j in range(count)]


def describe_buckets(items: Sequence[Item], instances: Sequence[Example], on: bool, step: int) -> str:
    """The bucket table printed before training (instance images per training size)."""
    counts: Counter[bk.Size] = Counter()
    seen: set[int] = set()
    for it in items:
        if it.instance not in seen:
            seen.add(it.instance)
            counts[it.size] += 1
    header = (
        f"aspect-ratio buckets (step {step} px; --no-enable_bucket crops square): {len(counts)} in use"
        if on
        else "square training size (no aspect-ratio buckets)"
    )
    return bk.bucket_table(counts, header)


def read_prompt_file(path: str | Path) -> list[str]:
    """--validation_prompt_file: one prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"--validation_prompt_file {p} cannot be read ({type(e).__name__}); pass a UTF-8 text file"
        ) from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--validation_prompt_file {p} holds no prompt; write one prompt per line")
    return prompts
