"""Aspect-ratio buckets: the table of sizes, which bucket each image goes to, and the resize + crop into it.

The table is kohya sd-scripts' (``make_bucket_resolutions``): widths from the shortest to the longest side in
steps, each with the tallest height (a multiple of the step) that keeps the area within ``resolution**2``,
both orientations, plus the square. Assignment: the bucket nearest the image's aspect ratio (distance of
log aspect ratios, so 2:1 and 1:2 are equally far from 1:1) among those the image covers with at most one
step left over after the resize; only an image more extreme than every bucket is cropped more.

Pure functions of sizes, except :func:`image_size` (reads a header) and :func:`fit_to_bucket` (resamples).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

Size = tuple[int, int]  # (width, height) in pixels

# Images enlarged by more than this to cover their bucket (or the square crop) are named in a warning.
MAX_UPSCALE = 1.5
LATENT_FACTOR = 8  # VAE downsampling: the cached image's sides are multiples of this


@dataclass(frozen=True)
class BucketSettings:
    """The bucket flags of a run (``--min_bucket_reso``, ``--max_bucket_reso``, ``--bucket_reso_steps``)."""

    min_reso: int | None = None  # default: resolution / 2
    max_reso: int | None = None  # default: resolution * 2, at most ``limit``
    step: int = 64
    limit: int | None = None  # the longest side the model takes (its position embedding); None: no limit

    def bounds(self, resolution: int) -> tuple[int, int]:
        lo = self.min_reso if self.min_reso is not None else max(self.step, resolution // 2 // self.step * self.step)
        hi = self.max_reso if self.max_reso is not None else resolution * 2 // self.step * self.step
        if self.max_reso is None and self.limit:
            hi = min(hi, self.limit // self.step * self.step)
        return lo, hi


def bucket_sizes(resolution: int, settings: BucketSettings) -> list[Size]:
    """Every bucket of about ``resolution**2`` pixels (never more), sides multiples of the step, sorted."""
    lo, hi = settings.bounds(resolution)
    step, area = settings.step, resolution * resolution
    side = max(step, int(math.sqrt(area)) // step * step)
    sizes = {(side, side)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def cover_scale(size: Size, bucket: Size) -> float:
    """The factor that resizes ``size`` to just cover ``bucket`` (aspect ratio kept)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def overhang(size: Size, bucket: Size) -> int:
    """Pixels cropped from the longer way after the cover resize (the "remainder"), at bucket scale."""
    w, h = resized_size(size, bucket)
    return max(w - bucket[0], h - bucket[1])


def resized_size(size: Size, bucket: Size) -> Size:
    """The cover resize in whole pixels: one side equals the bucket's, the other is at least the bucket's."""
    s = cover_scale(size, bucket)
    return max(bucket[0], round(size[0] * s)), max(bucket[1], round(size[1] * s))


def nearest_bucket(size: Size, buckets: Sequence[Size], step: int) -> Size:
    """The bucket nearest in log aspect ratio among those cropping at most ``step`` pixels (ties: the larger)."""
    ratio = math.log(size[0] / size[1])

    def distance(b: Size) -> tuple[float, int]:
        return abs(ratio - math.log(b[0] / b[1])), -b[0] * b[1]

    close = [b for b in buckets if overhang(size, b) <= step]
    return min(close or buckets, key=distance)


def crop_box(resized: Size, bucket: Size, center_crop: bool) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of the resized image that is cached.

    With ``center_crop`` exactly the bucket, centred. Otherwise the whole remainder is kept (trimmed to
    multiples of 8 pixels, centred) and the trainer picks a random bucket-sized window in latent space
    each step, so no crop is frozen at caching time.
    """
    w, h = resized
    if center_crop:
        cw, ch = bucket
    else:
        cw = bucket[0] + (w - bucket[0]) // LATENT_FACTOR * LATENT_FACTOR
        ch = bucket[1] + (h - bucket[1]) // LATENT_FACTOR * LATENT_FACTOR
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def fit_to_bucket(
    img: Image.Image, bucket: Size, center_crop: bool, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Resize to cover ``bucket``, then crop to :func:`crop_box` (masks pass ``resample`` BOX)."""
    new = resized_size(img.size, bucket)
    if new != img.size:
        img = img.resize(new, resample)
    box = crop_box(new, bucket, center_crop)
    return img if box == (0, 0, *new) else img.crop(box)


def image_size(path: Path) -> Size:
    """(width, height) as the image is shown, i.e. after its EXIF orientation; reads the header only."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def buckets_needed(sizes: Iterable[Size], buckets: Sequence[Size], step: int) -> bool:
    """The default of ``--enable_bucket``: on unless every image would go to the square bucket anyway (then
    the square crop is what buckets would do, and the run stays exactly as without them)."""
    square = [b for b in buckets if b[0] == b[1]]
    return any(nearest_bucket(s, buckets, step) not in square for s in sizes)


def square_scale(size: Size, resolution: int) -> float:
    """The enlargement of the square crop's resize (shorter side to ``resolution``)."""
    return resolution / min(size)


def upscale_warning(scales: dict[str, float], limit: float = MAX_UPSCALE, show: int = 5) -> str | None:
    """One warning line naming the images enlarged by more than ``limit`` (largest first), or None."""
    big = sorted(((s, name) for name, s in scales.items() if s > limit), reverse=True)
    if not big:
        return None
    named = ", ".join(f"{name} ({s:.1f}x)" for s, name in big[:show])
    more = f" and {len(big) - show} more" if len(big) > show else ""
    return (
        f"warning: {len(big)} image(s) are enlarged by more than {limit}x to fill their training size: {named}{more}; "
        "they will look soft: use larger photos, or lower --resolution"
    )


def bucket_table(counts: Counter[Size], header: str) -> str:
    """The table printed before training: each bucket in use and how many images it holds."""
    lines = [header, f"  {'bucket':<12} {'tokens':>7} {'images':>7}"]
    for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1]):
        lines.append(f"  {f'{w}x{h}':<12} {(w // 16) * (h // 16):>7} {n:>7}")
    return "\n".join(lines)


def batch_shapes(counts: Mapping[Hashable, int], batch: int) -> set[tuple[Hashable, int]]:
    """Every (training size, items in the batch) an epoch's batches can have, from the items per size: a batch
    holds one size, and each size's last batch may be partial. These are the shapes compiled blocks see."""
    out = set()
    for key, n in counts.items():
        out.add((key, min(n, batch)))
        if n % batch:
            out.add((key, n % batch))
    return out
