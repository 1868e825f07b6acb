"""Masked loss: the maths (a mask of zeros outside a square trains nothing there), masks cropped exactly as
their latents, the mask cache, and every bad mask as one line through the real CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3booth.cli import main
from sd3booth.data import masks as dm
from sd3booth.data.buckets import fit_to_bucket
from sd3booth.data.concepts import Item
from sd3booth.data.dataset import Example
from sd3booth.train import flow
from sd3booth.train.batch import BatchSource, make_batch
from sd3booth.train.loss import FlowSettings, flow_matching_loss
from sd3booth.train.order import DataOrder


def _square_mask(b: int, h: int, w: int, top: int, left: int, size: int) -> torch.Tensor:
    m = torch.zeros(b, 1, h, w)
    m[:, :, top : top + size, left : left + size] = 1.0
    return m


def test_masked_loss_is_the_mean_over_the_mask_and_ones_give_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 16, 8, 6, generator=g)
    w = torch.rand(2, 1, 1, 1, generator=g) + 0.5
    ones = torch.ones(2, 1, 8, 6)
    torch.testing.assert_close(flow.masked_per_sample_loss(pred, tgt, w, ones), flow.per_sample_loss(pred, tgt, w))
    m = _square_mask(2, 8, 6, 2, 1, 4)
    inside = (w * (pred - tgt) ** 2)[:, :, 2:6, 1:5]
    torch.testing.assert_close(flow.masked_per_sample_loss(pred, tgt, w, m), inside.reshape(2, -1).mean(1))
    half = m * 0.5 + _square_mask(2, 8, 6, 2, 1, 4) * 0.0  # grey: same normalised loss, area-weighted
    torch.testing.assert_close(flow.masked_per_sample_loss(pred, tgt, w, half), inside.reshape(2, -1).mean(1))
    assert flow.masked_per_sample_loss(pred, tgt, w, torch.zeros(2, 1, 8, 6)).abs().max() == 0
    for kind in ("huber", "smooth_l1"):  # the robust losses of --loss_type are masked alike
        torch.testing.assert_close(
            flow.masked_per_sample_loss(pred, tgt, w, ones, kind, 0.2), flow.per_sample_loss(pred, tgt, w, kind, 0.2)
        )


def test_a_mask_of_zeros_outside_a_square_trains_nothing_there():
    """Through the loss the loop runs: the gradient reaching the model's output is zero outside the square."""
    sched_sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sched_t = sched_sigmas * 1000
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(1, 16, 8, 8, requires_grad=True)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 0.3 + bias

    mask = _square_mask(2, 8, 8, 2, 3, 4)
    torch.manual_seed(0)
    loss = flow_matching_loss(model, x0, 2, sched_sigmas, sched_t, FlowSettings(), mask=mask)
    loss.backward()
    outside = (1 - mask[0, 0]).bool()
    assert bias.grad[0][:, outside].abs().max() == 0
    assert bias.grad[0][:, ~outside].abs().min() > 0


def _source(latents: dict, mask_keys: dict, masks: dict, sizes: list, flip: bool, center: bool) -> BatchSource:
    from sd3booth.cache.text import TextEmbedding

    ex = [Example(f"{i}.png", Path(f"{i}.png"), "c", "x") for i in range(len(sizes))]
    text = {"k": TextEmbedding(torch.zeros(3, 4), torch.zeros(2))}
    items = [Item(i, None, s, 0) for i, s in enumerate(sizes)]
    return BatchSource(ex, [], items, DataOrder(sizes, 1, 1, 0), latents,
                       {(e.uid, s, f): f"{e.uid}-{f}" for e, s in zip(ex, sizes) for f in (False, True)},
                       text, {"c": "k"}, center, flip, 0.0, 1.0, 0, masks=masks, mask_keys=mask_keys)  # fmt: skip


def test_the_mask_window_is_the_latent_window_whatever_the_crop_and_flip(monkeypatch):
    """Random latent crops and flips move the mask with its latent: encode each latent pixel's (row, column)
    in the latent, and the mask as a function of the same coordinates; the batch's mask must match."""
    h, w = 12, 9  # cached latent (remainder beyond the 8 x 6 bucket window)
    rows = torch.arange(h).view(h, 1).expand(h, w).float()
    cols = torch.arange(w).view(1, w).expand(h, w).float()
    mean = torch.stack([rows, cols] + [torch.zeros(h, w)] * 14)
    flipped = mean.flip(-1)
    mask = ((rows * 31 + cols * 7) % 5 / 4.0)[None]  # an arbitrary pattern
    size = (48, 64)  # (w, h) pixels -> 6 x 8 latent
    src = _source({"instance/0.png-False": (mean, torch.zeros_like(mean)),
                   "instance/0.png-True": (flipped, torch.zeros_like(mean))},
                  {("instance/0.png", size): "m"}, {"m": mask}, [size], flip=True, center=False)  # fmt: skip
    seen_flips = set()
    for m in range(12):
        b = make_batch(src, m, 0)
        x = b.x0[0]
        r, c = x[0].long(), x[1].long()
        assert x.shape == (16, 8, 6)
        seen_flips.add(bool(c[0, 0] > c[0, -1]))
        torch.testing.assert_close(b.mask[0, 0], mask[0][r, c])
    assert seen_flips == {True, False}


def test_latent_mask_crops_like_its_image_and_alpha_equals_a_mask_file(tmp_path):
    w, h = 100, 60
    alpha = np.zeros((h, w), np.uint8)
    alpha[10:50, 30:70] = 255
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img.png")
    Image.fromarray(alpha, "L").save(tmp_path / "mask.jpg", quality=100)
    from_alpha = dm.latent_mask(tmp_path / "img.png", True, (80, 48), 64, True)
    from_file = dm.latent_mask(tmp_path / "mask.jpg", False, (80, 48), 64, True)
    assert from_alpha.shape == (1, 6, 10)
    torch.testing.assert_close(from_alpha, from_file, atol=0.02, rtol=0)
    expected = dm.to_latent_mask(fit_to_bucket(Image.fromarray(alpha, "L"), (80, 48), True, Image.Resampling.BOX))
    torch.testing.assert_close(from_alpha, expected)
    assert 0.2 < from_alpha.mean() < 0.35  # the square's share of the crop
    assert dm.latent_mask(tmp_path / "img.png", True, None, 48, True).shape == (1, 6, 6)


def _photos(root: Path, n: int = 2, mode: str = "RGB") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (64, 64), (200, 100 + 40 * i, 50, 255)[: len(mode)]).save(root / f"img{i}.png")
    return root


def _masks(root: Path, names: list[str], size: tuple[int, int] = (64, 64), fill: int = 255) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", size, fill).save(root / name)
    return root


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "2", "--report_to", "none", "--seed", "0",
            "--learning_rate", "1e-2", "--lr_warmup_steps", "0", *extra]  # fmt: skip


BAD = {
    "missing-mask": (lambda t: _masks(t / "masks", ["img0.png"]), ["img1.png", "no mask", "masks"]),
    "unreadable-mask": (
        lambda t: (_masks(t / "masks", ["img0.png"]), (t / "masks" / "img1.webp").write_bytes(b"not an image"))[0],
        ["img1.webp", "img1.png", "cannot be read"],
    ),
    "mismatched-size": (
        lambda t: (_masks(t / "masks", ["img0.png"]), _masks(t / "masks", ["img1.jpg"], size=(32, 64)))[0],
        ["img1.jpg", "32x64", "64x64", "img1.png"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_masks_are_one_line_naming_the_image(case, tiny_model, tmp_path, capsys):
    make, needles = BAD[case]
    data, masks, out = _photos(tmp_path / "photos"), make(tmp_path), tmp_path / "out"
    rc = main(_args(tiny_model, data, out, "--masked_loss", "--mask_dir", str(masks)))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needles), line
    assert not (out / "settings.json").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--masked_loss", "--alpha_mask"], "has no alpha channel"),
        (["--masked_loss"], "--masked_loss needs masks"),
        (["--alpha_mask"], "--alpha_mask is used only with --masked_loss"),
        (["--masked_loss", "--alpha_mask", "--mask_dir", "x"], "choose one"),
    ],
)
def test_bad_mask_flags_are_one_line(extra, needle, tiny_model, tmp_path, capsys):
    rc = main(_args(tiny_model, _photos(tmp_path / "photos"), tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_masks_of_zeros_train_nothing_and_masks_are_cached_beside_the_latents(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file

    data = _photos(tmp_path / "photos")
    zeros = _masks(tmp_path / "zeros", ["img0.png", "img1.png"], fill=0)
    cache = ["--cache_dir", str(tmp_path / "cache")]
    assert main(_args(tiny_model, data, tmp_path / "masked", "--masked_loss", "--mask_dir", str(zeros), *cache)) == 0
    assert "making 1 loss mask(s)" in capsys.readouterr().out  # two identical mask files: one entry
    assert main(_args(tiny_model, data, tmp_path / "plain", *cache)) == 0
    masked = load_file(tmp_path / "masked" / "pytorch_lora_weights.safetensors")
    plain = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    assert all(v.abs().max() == 0 for k, v in masked.items() if "lora_B" in k)  # no gradient reached the LoRA
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)  # the same run unmasked trains
    entries = list((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(entries) == 3  # two latents and the mask, side by side
    shapes = sorted(tuple(load_file(p).get("mask", torch.empty(0)).shape) for p in entries)
    assert shapes.count((1, 8, 8)) == 1
