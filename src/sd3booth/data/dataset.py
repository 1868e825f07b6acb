"""Files -> examples: find instance/class images, resolve their captions, load and prepare pixels.

No ML models here. Caption precedence per image: ``metadata.jsonl`` in the data root, then a same-stem
``.txt`` sidecar, then ``--instance_prompt``. Bad input raises :class:`~sd3booth.errors.UserError` with a
single-line message naming the file (and line) and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sd3booth.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class Example:
    """One training image and its caption.

    ``id`` is the image path relative to the data root in posix style (stable across machines);
    ``caption_source`` says where the caption came from, e.g. ``"metadata.jsonl:7"``, ``"img1.txt"``,
    ``"instance_prompt"`` or ``"class_prompt"``.
    """

    id: str
    path: Path
    caption: str
    caption_source: str
    is_class: bool = False
    concept: int = 0  # index of its [[datasets]] entry (0 without --dataset_config)

    @property
    def uid(self) -> str:
        """Unique across instance and class images and concepts (their ids may coincide)."""
        kind = "class" if self.is_class else "instance"
        return f"{kind}/{self.id}" if self.concept == 0 else f"{kind}{self.concept}/{self.id}"


def _one_line(text: str) -> str:
    """Collapse all whitespace runs containing line breaks so a message is exactly one line."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


def _user_error(text: str) -> UserError:
    return UserError(_one_line(text))


def _walk_images(root: Path, exclude: Sequence[Path] = ()) -> list[tuple[str, Path]]:
    """(id, absolute path) of every non-hidden image file under ``root``, recursively, sorted by id.

    Folders in ``exclude`` (resolved paths: the run's output and cache folders) are never entered, so a scan
    cannot pick up a run's own validation images or generated files.
    """
    found: list[tuple[str, Path]] = []
    skip = {Path(p).resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (Path(dirpath) / d).resolve() not in skip)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _unreadable_reason(path: Path) -> str | None:
    """None if ``path`` looks like a readable image (cheap PIL verify), else a short reason."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    return None


def _read_metadata(root: Path, caption_column: str, image_column: str) -> dict[str, tuple[str, int]]:
    """Parse ``root/metadata.jsonl`` into {image id: (caption, 1-based line)}; {} if there is none."""
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        return {}
    example = json.dumps({image_column: "img1.jpg", caption_column: "a photo of sks dog"})
    try:
        lines = meta_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise _user_error(f"{meta_path} is not valid UTF-8 text ({e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise _user_error(f"cannot read {meta_path} ({e.strerror or e}); check its permissions") from e

    entries: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{meta_path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _user_error(
                f"{where}: not valid JSON ({e.msg}); each line must be one JSON object like {example}"
            ) from e
        if not isinstance(record, dict):
            raise _user_error(
                f"{where}: expected a JSON object, got {type(record).__name__}; each line must look like {example}"
            )
        for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
            if column not in record:
                keys = ", ".join(map(str, record)) or "none"
                raise _user_error(
                    f'{where}: missing key "{column}" (keys present: {keys}); add it, '
                    f"or pass {flag} to name the key that holds it"
                )
        file_name, caption = record[image_column], record[caption_column]
        if not isinstance(file_name, str) or not file_name.strip():
            raise _user_error(
                f'{where}: "{image_column}" must be a non-empty string (the image path relative to {root}), '
                f"got {file_name!r}; fix the value"
            )
        if not isinstance(caption, str):
            raise _user_error(
                f'{where}: "{caption_column}" must be a string, got {type(caption).__name__} {caption!r}; '
                "write the caption as a JSON string"
            )
        rel = os.path.normpath(file_name.strip().replace("\\", "/"))
        if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
            raise _user_error(
                f'{where}: "{image_column}" {file_name!r} points outside {root}; use a path relative to that folder'
            )
        image_path = root / rel
        if not image_path.is_file():
            raise _user_error(
                f'{where}: "{image_column}" {file_name!r} names a file that does not exist ({image_path}); '
                "fix the name or remove the line"
            )
        if image_path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise _user_error(
                f'{where}: "{image_column}" {file_name!r} is not an image file '
                f"(allowed: {', '.join(sorted(IMAGE_EXTENSIONS))}); fix the name or remove the line"
            )
        image_id = Path(rel).as_posix()
        if image_id in entries:
            raise _user_error(
                f"{where}: {image_id!r} is already listed on line {entries[image_id][1]}; keep one line per image"
            )
        entries[image_id] = (caption.strip(), lineno)
    return entries


def _read_sidecar(txt_path: Path) -> str:
    try:
        return txt_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise _user_error(f"caption file {txt_path} is not valid UTF-8 text ({e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise _user_error(f"cannot read caption file {txt_path} ({e.strerror or e}); check its permissions") from e


def scan_images(
    root: Path,
    *,
    caption_column: str = "caption",
    image_column: str = "file_name",
    instance_prompt: str | None = None,
    warn: Callable[[str], None] = print,
    exclude: Sequence[Path] = (),
    concept: int = 0,
) -> list[Example]:
    """Find the instance images under ``root`` (recursively, hidden files skipped) and resolve their captions.

    Caption precedence per image: ``root/metadata.jsonl`` entry (non-empty caption), same-stem ``.txt`` sidecar
    (non-empty after stripping), ``instance_prompt``. Unreadable images are skipped with one ``warn`` line each.
    Returns examples sorted by id. Raises UserError for a missing folder, malformed metadata, no usable images,
    or an image without any caption.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise _user_error(f"instance data path {root} {what}; it should be a folder of images (--instance_data_dir)")
    root = root.resolve()

    metadata = _read_metadata(root, caption_column, image_column)
    found = _walk_images(root, exclude)
    if not found:
        raise _user_error(
            f"no image files found in {root} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put your instance images there"
        )

    usable: list[tuple[str, Path]] = []
    for image_id, path in found:
        reason = _unreadable_reason(path)
        if reason is None:
            usable.append((image_id, path))
        else:
            warn(_one_line(f"warning: skipping {path}: {reason}"))
    if not usable:
        raise _user_error(
            f"no usable images in {root}: all {len(found)} image file(s) are empty or unreadable "
            "(see the warnings above); add valid images"
        )

    prompt = instance_prompt.strip() if instance_prompt else ""
    examples: list[Example] = []
    missing: list[str] = []
    for image_id, path in usable:
        entry = metadata.get(image_id)
        if entry is not None and entry[0]:
            examples.append(Example(image_id, path, entry[0], f"{METADATA_FILE}:{entry[1]}", concept=concept))
            continue
        txt_path = path.with_suffix(".txt")
        caption = _read_sidecar(txt_path) if txt_path.is_file() else ""
        if caption:
            examples.append(Example(image_id, path, caption, txt_path.relative_to(root).as_posix(), concept=concept))
        elif prompt:
            examples.append(Example(image_id, path, prompt, "instance_prompt", concept=concept))
        else:
            missing.append(image_id)
    if missing:
        first = root / missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _user_error(
            f"no caption for image {first}{more}: pass --instance_prompt (e.g. 'a photo of sks dog'), "
            f"add a caption file {first.with_suffix('.txt')}, or list it in {root / METADATA_FILE}"
        )
    return examples


def scan_class_images(root: Path, class_prompt: str, concept: int = 0, exclude: Sequence[Path] = ()) -> list[Example]:
    """All readable images under ``root`` (created if missing) as class examples captioned ``class_prompt``.

    Unreadable images are skipped silently (they are regenerated/ignored by the caller); sorted by id.
    """
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise _user_error(f"class data path {root} is not a folder; point --class_data_dir at a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _user_error(f"cannot create class data folder {root} ({e.strerror or e}); choose a writable path") from e
    root = root.resolve()
    return [
        Example(image_id, path, class_prompt, "class_prompt", is_class=True, concept=concept)
        for image_id, path in _walk_images(root, exclude)
        if _unreadable_reason(path) is None
    ]


def _int_gray_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB without clipping 16-bit data to white."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode in _INT16_MODES or (im.mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    arr = np.clip(np.nan_to_num(arr), 0.0, 255.0).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in _ALPHA_MODES or ("transparency" in im.info and im.mode in {"P", "L", "1", "RGB"})
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in _INT16_MODES or im.mode in {"I", "F"}:
        return _int_gray_to_rgb(im)
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def load_image(path: Path) -> Image.Image:
    """Open ``path``, apply its EXIF orientation and return a fully loaded RGB image.

    Transparent pixels (RGBA, LA, P with transparency, ...) are composited over white; grayscale, palette,
    CMYK, YCbCr and 16-bit images are converted to 8-bit RGB. Raises UserError if the file cannot be read.
    """
    try:
        with Image.open(path) as im:
            im.load()
            img = _to_rgb(ImageOps.exif_transpose(im))
            img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise _user_error(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove the file") from e
    return img


def resize_and_crop(
    img: Image.Image, resolution: int, center_crop: bool, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Resize with LANCZOS so the shorter side is ``resolution`` (aspect kept), then crop.

    With ``center_crop`` the result is exactly ``resolution x resolution`` (center crop). Without it the resized
    image is kept uncropped except that each side is floored to a multiple of 16 pixels by trimming equally
    from both ends (so the shorter side becomes ``resolution`` rounded down to a multiple of 16); the trainer
    crops randomly in latent space later. All sizes are ints (the longer side is rounded to the nearest pixel).
    """
    resolution = int(resolution)
    if resolution < (1 if center_crop else 16):
        raise ValueError(f"resolution must be >= {1 if center_crop else 16}, got {resolution}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"image has no pixels: size {img.size}")
    if w <= h:
        new_w, new_h = resolution, max(resolution, round(h * resolution / w))
    else:
        new_w, new_h = max(resolution, round(w * resolution / h)), resolution
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    if center_crop:
        target_w = target_h = resolution
    else:
        target_w, target_h = new_w - new_w % 16, new_h - new_h % 16
    if (target_w, target_h) == (new_w, new_h):
        return img
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return img.crop((left, top, left + target_w, top + target_h))


def to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """(3, H, W) float32 tensor in [-1, 1] (``x / 127.5 - 1``), horizontally flipped if ``flip``."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # writable copy (torch warns on read-only arrays)
    if flip:
        arr = arr[:, ::-1, :]
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(torch.float32)
    return (tensor / 127.5 - 1.0).contiguous()


def file_digest(path: Path) -> str:
    """sha256 hex digest of the file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_DEMO_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
_DEMO_SHAPES = ("disc", "square", "triangle", "ring")


def _shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from an (approximate) signed distance to the shape."""
    if shape == "disc":
        sdf = np.hypot(dx, dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    elif shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])  # pointing up in image coordinates
        sdf = np.max([np.cos(a) * dx + np.sin(a) * dy for a in angles], axis=0) - 0.5 * r
    else:  # ring
        sdf = np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r
    return np.clip(0.5 - sdf, 0.0, 1.0)


def write_demo_like_dataset(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` procedural ``size x size`` RGB PNGs (a coloured shape on a gradient) and ``metadata.jsonl``.

    Deterministic given ``seed``; captions look like ``"a photo of sks toy, red disc"``. Returns the image paths.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    color_names = list(_DEMO_COLORS)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    paths: list[Path] = []
    records: list[str] = []
    for i in range(n):
        shape = _DEMO_SHAPES[i % len(_DEMO_SHAPES)]
        color_name = color_names[int(rng.integers(len(color_names)))]
        c0, c1 = rng.integers(60, 256, size=(2, 3)).astype(np.float64)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
        background = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
        r = size * rng.uniform(0.22, 0.32)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        cover = _shape_coverage(shape, xx - cx, yy - cy, r)[..., None]
        pixels = background * (1.0 - cover) + np.asarray(_DEMO_COLORS[color_name], dtype=np.float64) * cover
        path = root / f"toy_{i:02d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(path, format="PNG")
        paths.append(path)
        records.append(json.dumps({"file_name": path.name, "caption": f"a photo of sks toy, {color_name} {shape}"}))
    (root / METADATA_FILE).write_text("".join(r + "\n" for r in records), encoding="utf-8")
    return paths
