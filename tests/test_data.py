"""Tests for sd3booth.data: scanning, captions, image loading and preparation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3booth.data.dataset import (
    IMAGE_EXTENSIONS,
    Example,
    file_digest,
    load_image,
    resize_and_crop,
    scan_class_images,
    scan_images,
    to_tensor,
    write_demo_like_dataset,
)
from sd3booth.errors import UserError


def _png(path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(root: Path, *lines: object) -> Path:
    meta = root / "metadata.jsonl"
    meta.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return meta


def _assert_one_line_error(excinfo: pytest.ExceptionInfo[UserError], *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


class _Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# --- captions -----------------------------------------------------------------------------------------------------


def test_caption_precedence_metadata_then_txt_then_prompt(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("from txt a", encoding="utf-8")  # loses to metadata
    (tmp_path / "b.txt").write_text("  from txt b \n", encoding="utf-8")
    _jsonl(tmp_path, "", {"file_name": "a.png", "caption": "from meta a"}, "   ")

    examples = scan_images(tmp_path, instance_prompt="a photo of sks dog")

    assert [e.id for e in examples] == ["a.png", "b.png", "c.png"]
    by_id = {e.id: e for e in examples}
    assert (by_id["a.png"].caption, by_id["a.png"].caption_source) == ("from meta a", "metadata.jsonl:2")
    assert (by_id["b.png"].caption, by_id["b.png"].caption_source) == ("from txt b", "b.txt")
    assert (by_id["c.png"].caption, by_id["c.png"].caption_source) == ("a photo of sks dog", "instance_prompt")
    for e in examples:
        assert isinstance(e, Example) and e.path.is_absolute() and e.path.is_file() and not e.is_class
        assert e.path == (tmp_path / e.id).resolve()


def test_recursive_ids_sorted_and_sidecar_in_subdir(tmp_path: Path) -> None:
    _png(tmp_path / "z.png")
    _png(tmp_path / "sub" / "img1.JPG")
    _png(tmp_path / "sub" / "deeper" / "x.jpeg")
    (tmp_path / "sub" / "img1.txt").write_text("sub caption", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")

    examples = scan_images(tmp_path, instance_prompt="p")

    assert [e.id for e in examples] == ["sub/deeper/x.jpeg", "sub/img1.JPG", "z.png"]
    assert examples[1].caption == "sub caption" and examples[1].caption_source == "sub/img1.txt"


def test_metadata_names_file_in_subdir(tmp_path: Path) -> None:
    _png(tmp_path / "sub" / "a.png")
    _jsonl(tmp_path, {"file_name": "./sub/a.png", "caption": "meta"})
    (ex,) = scan_images(tmp_path)
    assert (ex.id, ex.caption, ex.caption_source) == ("sub/a.png", "meta", "metadata.jsonl:1")


def test_empty_metadata_caption_falls_through(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("txt wins", encoding="utf-8")
    _jsonl(tmp_path, {"file_name": "a.png", "caption": "   "})
    (ex,) = scan_images(tmp_path)
    assert (ex.caption, ex.caption_source) == ("txt wins", "a.txt")


def test_metadata_naming_non_image_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    _jsonl(tmp_path, {"file_name": "notes.md", "caption": "x"})
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path, instance_prompt="p")
    _assert_one_line_error(excinfo, "metadata.jsonl", "line 1", "not an image file")


def test_custom_columns(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _jsonl(tmp_path, {"image": "a.png", "text": "custom caption", "caption": "ignored"})
    (ex,) = scan_images(tmp_path, caption_column="text", image_column="image")
    assert ex.caption == "custom caption" and ex.caption_source == "metadata.jsonl:1"

    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path)  # default column "file_name" is absent
    _assert_one_line_error(excinfo, "metadata.jsonl", "line 1", "file_name", "--image_column")


def test_empty_txt_falls_through(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" \n\t", encoding="utf-8")
    (ex,) = scan_images(tmp_path, instance_prompt="fallback prompt")
    assert (ex.caption, ex.caption_source) == ("fallback prompt", "instance_prompt")


def test_missing_caption_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path)
    _assert_one_line_error(excinfo, "a.png", "and 1 more", "--instance_prompt", ".txt", "metadata.jsonl")


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"file_name": "a.png"}), '"caption"'),
        (json.dumps({"caption": "x"}), '"file_name"'),
        (json.dumps({"file_name": "a.png", "caption": 3}), "must be a string"),
        (json.dumps({"file_name": "missing.png", "caption": "x"}), "does not exist"),
        (json.dumps({"file_name": "../a.png", "caption": "x"}), "outside"),
        (json.dumps({"file_name": "a.png", "caption": "dup"}), "already listed on line 1"),
    ],
)
def test_malformed_metadata_line(tmp_path: Path, bad_line: str, needle: str) -> None:
    _png(tmp_path / "a.png")
    _jsonl(tmp_path, {"file_name": "a.png", "caption": "ok"}, "", bad_line)
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path, instance_prompt="p")
    _assert_one_line_error(excinfo, str(tmp_path / "metadata.jsonl"), "line 3", needle)


# --- unreadable, missing, hidden ----------------------------------------------------------------------------------


def test_unreadable_images_skipped_with_one_warning_each(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"this is definitely not a png file")
    warnings = _Warnings()

    examples = scan_images(tmp_path, instance_prompt="p", warn=warnings)

    assert [e.id for e in examples] == ["good.png"]
    assert len(warnings) == 2
    assert any("empty.jpg" in w for w in warnings) and any("corrupt.png" in w for w in warnings)
    assert all("\n" not in w for w in warnings)


def test_error_when_no_usable_images_remain(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    warnings = _Warnings()
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path, instance_prompt="p", warn=warnings)
    _assert_one_line_error(excinfo, "no usable images", str(tmp_path.resolve()))
    assert len(warnings) == 2


def test_missing_dir_and_file_instead_of_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path / "nope", instance_prompt="p")
    _assert_one_line_error(excinfo, str(tmp_path / "nope"), "does not exist", "folder of images")

    _png(tmp_path / "file.png")
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path / "file.png", instance_prompt="p")
    _assert_one_line_error(excinfo, "file.png", "not a folder")


def test_empty_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        scan_images(tmp_path, instance_prompt="p")
    _assert_one_line_error(excinfo, "no image files", str(tmp_path.resolve()))


def test_hidden_files_and_dirs_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "visible.png")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".cache" / "inside.png")
    _png(tmp_path / "sub" / ".also_hidden.jpg")
    warnings = _Warnings()
    examples = scan_images(tmp_path, instance_prompt="p", warn=warnings)
    assert [e.id for e in examples] == ["visible.png"]
    assert warnings == []


def test_only_hidden_images_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / ".hidden.png")
    with pytest.raises(UserError):
        scan_images(tmp_path, instance_prompt="p")


# --- class images -------------------------------------------------------------------------------------------------


def test_scan_class_images(tmp_path: Path) -> None:
    class_dir = tmp_path / "a" / "b" / "class"
    assert scan_class_images(class_dir, "a photo of dog") == []
    assert class_dir.is_dir()

    _png(class_dir / "2.png")
    _png(class_dir / "1.png")
    (class_dir / "broken.png").write_bytes(b"")
    (class_dir / "bad.jpg").write_bytes(b"junk")
    examples = scan_class_images(class_dir, "a photo of dog")

    assert [e.id for e in examples] == ["1.png", "2.png"]
    assert all(e.is_class and e.caption == "a photo of dog" and e.caption_source == "class_prompt" for e in examples)
    assert all(e.path.is_absolute() for e in examples)


# --- load_image ---------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    out = load_image(path)
    assert out.size == (20, 40)
    assert out.mode == "RGB"


@pytest.mark.parametrize(
    ("mode", "fmt", "value"),
    [
        ("RGBA", "PNG", (10, 20, 30, 255)),
        ("LA", "PNG", (100, 255)),
        ("L", "PNG", 100),
        ("P", "PNG", 3),
        ("CMYK", "JPEG", (0, 0, 0, 0)),
        ("CMYK", "TIFF", (0, 255, 255, 0)),
        ("YCbCr", "JPEG", (100, 128, 128)),
        ("1", "PNG", 1),
        ("F", "TIFF", 0.5),
    ],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, fmt: str, value: object) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (6, 5), value).save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (6, 5)
    np.asarray(out)  # fully loaded, file closed


def test_known_colours_after_conversion(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "red.tif")
    assert load_image(tmp_path / "red.tif").getpixel((0, 0)) == (255, 0, 0)
    Image.new("L", (4, 4), 100).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (100, 100, 100)
    Image.new("F", (4, 4), 0.5).save(tmp_path / "float.tif")
    assert load_image(tmp_path / "float.tif").getpixel((0, 0)) == (128, 128, 128)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as raw:
        assert raw.mode in {"I;16", "I"}
    out = np.asarray(load_image(path))
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[1, 1, 0] < 10  # 1000/65535 is dark, not clipped to white


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)

    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    half.save(tmp_path / "half.png")
    assert abs(load_image(tmp_path / "half.png").getpixel((0, 0))[0] - 127) <= 1

    la = Image.new("LA", (1, 1), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    with Image.open(tmp_path / "pal.png") as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = load_image(tmp_path / "pal.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_load_image_unreadable_raises_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError) as excinfo:
        load_image(bad)
    _assert_one_line_error(excinfo, str(bad))
    with pytest.raises(UserError) as excinfo:
        load_image(tmp_path / "missing.png")
    _assert_one_line_error(excinfo, "missing.png")


# --- resize / tensor / digest -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "resolution", "center_crop", "expected"),
    [
        ((200, 100), 64, True, (64, 64)),
        ((100, 300), 64, True, (64, 64)),
        ((64, 64), 64, True, (64, 64)),
        ((10, 20), 64, True, (64, 64)),  # upscales
        ((200, 100), 64, False, (128, 64)),
        ((100, 300), 64, False, (64, 192)),
        ((300, 200), 100, False, (144, 96)),  # 150x100 -> floor to multiples of 16
        ((333, 200), 64, False, (96, 64)),  # 107x64 -> 96x64
    ],
)
def test_resize_and_crop_sizes(
    size: tuple[int, int], resolution: int, center_crop: bool, expected: tuple[int, int]
) -> None:
    out = resize_and_crop(Image.new("RGB", size, (1, 2, 3)), resolution, center_crop)
    assert out.size == expected
    assert all(isinstance(s, int) for s in out.size)
    if not center_crop:
        assert out.size[0] % 16 == 0 and out.size[1] % 16 == 0


def test_center_crop_keeps_the_center(tmp_path: Path) -> None:
    arr = np.zeros((64, 192, 3), dtype=np.uint8)
    arr[:, 64:128] = 255  # white middle third
    out = np.asarray(resize_and_crop(Image.fromarray(arr), 32, center_crop=True))
    assert out.shape == (32, 32, 3)
    assert out[4:-4, 4:-4].min() > 240

    arr = np.zeros((64, 200, 3), dtype=np.uint8)
    arr[:, :4] = 255  # left edge is trimmed equally with the right edge (200 -> 192)
    out = np.asarray(resize_and_crop(Image.fromarray(arr), 64, center_crop=False))
    assert out.shape == (64, 192, 3) and out.max() == 0


def test_resize_rejects_bad_resolution() -> None:
    with pytest.raises(ValueError):
        resize_and_crop(Image.new("RGB", (32, 32)), 8, center_crop=False)


def test_to_tensor_range_and_flip() -> None:
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[:, 0] = 255  # white left column
    arr[0, 1] = (0, 128, 255)
    img = Image.fromarray(arr)

    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.allclose(t[:, 0, 0], torch.ones(3))
    assert torch.allclose(t[:, 0, 1], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)

    f = to_tensor(img, flip=True)
    assert torch.equal(f, t.flip(-1))
    assert torch.allclose(f[:, :, 2], torch.ones(3, 2))


def test_file_digest_changes_with_content(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    d1 = file_digest(p)
    assert d1 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_digest(p) == d1
    p.write_bytes(b"abd")
    assert file_digest(p) != d1
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 * (1 << 20) + 5))  # spans several chunks
    assert file_digest(big) == hashlib.sha256(big.read_bytes()).hexdigest()


# --- demo dataset -------------------------------------------------------------------------------------------------


def test_write_demo_like_dataset_deterministic_and_scannable(tmp_path: Path) -> None:
    paths_a = write_demo_like_dataset(tmp_path / "a", n=5, size=48, seed=3)
    paths_b = write_demo_like_dataset(tmp_path / "b", n=5, size=48, seed=3)
    paths_c = write_demo_like_dataset(tmp_path / "c", n=5, size=48, seed=4)

    assert len(paths_a) == 5 and all(p.is_file() for p in paths_a)
    assert [file_digest(p) for p in paths_a] == [file_digest(p) for p in paths_b]
    assert [file_digest(p) for p in paths_a] != [file_digest(p) for p in paths_c]
    assert (tmp_path / "a" / "metadata.jsonl").read_bytes() == (tmp_path / "b" / "metadata.jsonl").read_bytes()

    for p in paths_a:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (48, 48)
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 10  # not a flat image

    examples = scan_images(tmp_path / "a")
    assert [e.path for e in examples] == [p.resolve() for p in paths_a]
    assert all(e.caption.startswith("a photo of sks toy, ") for e in examples)
    assert all(e.caption_source.startswith("metadata.jsonl:") for e in examples)
