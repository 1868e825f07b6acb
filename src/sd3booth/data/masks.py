"""Loss masks (``--masked_loss``): found beside each image, checked up front, brought to latent resolution.

A mask comes from ``--mask_dir`` (the image's relative path with any image extension, white = train, black =
ignore, grey in between) or from the image's own alpha channel (``--alpha_mask``). It goes through exactly
the resize and crop of its image (:func:`~sd3booth.data.buckets.fit_to_bucket` or
:func:`~sd3booth.data.dataset.resize_and_crop`), then each 8x8 pixel block is averaged into one latent
pixel, so the weight of a latent pixel is the fraction of its pixels that are to be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sd3booth.data.buckets import LATENT_FACTOR, Size, fit_to_bucket, image_size
from sd3booth.data.dataset import _ALPHA_MODES, IMAGE_EXTENSIONS, Example, resize_and_crop
from sd3booth.errors import UserError


def mask_file(mask_dir: Path, image_id: str) -> Path | None:
    """The mask of ``image_id`` (a path relative to its data folder): same relative stem, any image extension."""
    stem = Path(mask_dir) / Path(image_id).with_suffix("")
    found = sorted(p for p in stem.parent.glob(stem.name + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[0] if found else None


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as im:
        return im.mode in _ALPHA_MODES or ("transparency" in im.info and im.mode in {"P", "L", "1", "RGB"})


def find_masks(examples: Sequence[Example], mask_dir: Path | None, sizes: dict[str, Size]) -> dict[str, Path]:
    """example uid -> the file its mask is read from; every problem is a one-line UserError naming the image.

    ``mask_dir`` None means the alpha channel of each image (``--alpha_mask``). ``sizes`` holds each image's
    size (uid -> (w, h), after EXIF orientation); a mask of another size is refused.
    """
    out: dict[str, Path] = {}
    for ex in examples:
        if mask_dir is None:
            if not _has_alpha(ex.path):
                raise UserError(
                    f"--alpha_mask: image {ex.path} has no alpha channel; save it with transparency "
                    "(transparent = ignored), or give masks with --mask_dir"
                )
            out[ex.uid] = ex.path
            continue
        path = mask_file(mask_dir, ex.id)
        if path is None:
            raise UserError(
                f"no mask for image {ex.path} in {mask_dir} (looked for {Path(ex.id).with_suffix('.*')}); add one "
                "(white = train, black = ignore) or remove the image"
            )
        try:
            got = image_size(path)
        except Exception as e:  # PIL raises many types for broken files
            raise UserError(
                f"mask {path} of image {ex.path} cannot be read ({type(e).__name__}: {e}); replace it".replace(
                    "\n", " "
                )
            ) from None
        if got != sizes[ex.uid]:
            raise UserError(
                f"mask {path} is {got[0]}x{got[1]} but its image {ex.path} is {sizes[ex.uid][0]}x{sizes[ex.uid][1]}; "
                "a mask must have its image's size"
            )
        out[ex.uid] = path
    return out


def load_mask(path: Path, alpha: bool) -> Image.Image:
    """The mask as an 8-bit grey image ('L'), EXIF orientation applied: the file's luminance, or its alpha."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGBA").getchannel("A") if alpha else im.convert("L")
    except Exception as e:  # PIL raises many types for broken files
        raise UserError(f"cannot read mask {path} ({type(e).__name__}: {e}); replace it".replace("\n", " ")) from None


def to_latent_mask(mask: Image.Image) -> torch.Tensor:
    """(1, H/8, W/8) float32 in [0, 1]: the mean of each 8x8 block of the mask scaled to [0, 1]."""
    arr = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(arr, LATENT_FACTOR)[0]


def latent_mask(path: Path, alpha: bool, bucket: Size | None, resolution: int, center_crop: bool) -> torch.Tensor:
    """The mask of one image, cropped exactly as its image is for the latent cache, at latent resolution."""
    mask = load_mask(path, alpha)
    if bucket is not None:
        mask = fit_to_bucket(mask, bucket, center_crop, resample=Image.Resampling.BOX)
    else:
        mask = resize_and_crop(mask, resolution, center_crop, resample=Image.Resampling.BOX)
    return to_latent_mask(mask)
