"""Aspect-ratio buckets: the table, assignment, crop bounds, cache keys per bucket, one bucket per batch, the
planner's largest bucket, compiled blocks that do not recompile, and a mixed-aspect folder trained end to end."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3booth.cache import latents as cache_latents
from sd3booth.cache.store import content_key
from sd3booth.cli import main
from sd3booth.data import buckets as bk
from sd3booth.data import concepts
from sd3booth.data.dataset import Example, file_digest, scan_images
from sd3booth.train.order import DataOrder

STEP64 = bk.BucketSettings(step=64)


def test_bucket_table_is_kohyas_at_1024():
    table = bk.bucket_sizes(1024, STEP64)
    assert (1024, 1024) in table and (832, 1216) in table and (1216, 832) in table and (896, 1152) in table
    for w, h in table:
        assert w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048
        assert w * h <= 1024 * 1024 and (h, w) in table
    assert min(w * h for w, h in table) >= 0.9 * 1024 * 1024  # "about resolution^2 pixels"
    # --min_bucket_reso / --max_bucket_reso bound the sides
    narrow = bk.bucket_sizes(1024, bk.BucketSettings(768, 1344, 64))
    assert min(min(s) for s in narrow) >= 768 and max(max(s) for s in narrow) <= 1344 and (1024, 1024) in narrow


@pytest.mark.parametrize(("res", "step"), [(1024, 64), (512, 64), (768, 32), (1000, 64), (64, 16)])
def test_no_image_in_range_is_cropped_by_more_than_one_step(res, step):
    settings = bk.BucketSettings(step=step)
    table = bk.bucket_sizes(res, settings)
    lo, hi = min(w / h for w, h in table), max(w / h for w, h in table)
    worst = 0
    for i in range(801):
        a = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / 800)
        size = (round(3000 * a), 3000)
        bucket = bk.nearest_bucket(size, table, step)
        worst = max(worst, bk.overhang(size, bucket))
        w, h = bk.resized_size(size, bucket)
        assert (w == bucket[0] and h >= bucket[1]) or (h == bucket[1] and w >= bucket[0])  # covers, one side exact
    assert worst <= step


def test_assignment_is_the_nearest_aspect_ratio():
    table = bk.bucket_sizes(1024, STEP64)
    assert bk.nearest_bucket((3024, 4032), table, 64) == (896, 1152)  # 3:4 phone portrait
    assert bk.nearest_bucket((4032, 3024), table, 64) == (1152, 896)
    assert bk.nearest_bucket((1080, 1920), table, 64) == (768, 1344)  # 9:16
    assert bk.nearest_bucket((600, 600), table, 64) == (1024, 1024)
    for b in table:  # an image of a bucket's exact shape goes there, uncropped
        assert bk.nearest_bucket((b[0] * 3, b[1] * 3), table, 64) == b
        assert bk.overhang((b[0] * 3, b[1] * 3), b) == 0


def test_fit_to_bucket_crops_at_most_the_remainder():
    arr = np.zeros((300, 200, 3), np.uint8)
    arr[:, :, 0] = np.arange(200, dtype=np.uint8)[None, :]  # a horizontal ramp
    img = Image.fromarray(arr)
    bucket = (64, 80)
    resized = bk.resized_size(img.size, bucket)
    assert resized == (64, 96)
    centre = bk.fit_to_bucket(img, bucket, center_crop=True)
    assert centre.size == bucket
    kept = bk.fit_to_bucket(img, bucket, center_crop=False)
    assert kept.size == (64, 96)  # the whole remainder (a multiple of 8), cropped randomly in latent space later
    assert bk.crop_box((64, 101), bucket, False) == (0, 2, 64, 98)  # trimmed to multiples of 8, centred


def test_image_size_honours_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x20, shown 20x40
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert bk.image_size(path) == (20, 40)


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


MIXED = {"portrait": (60, 80), "landscape": (160, 90), "square": (100, 100), "tiny": (24, 32), "huge": (640, 480)}


def test_training_sizes_buckets_on_by_default_only_for_mixed_aspects(tmp_path):
    c = concepts.Concept(str(tmp_path), resolution=64)
    settings = bk.BucketSettings(step=16)
    square = scan_images(_folder(tmp_path / "sq", {"a": (80, 80), "b": (81, 80)}), instance_prompt="x")
    sizes, on, _ = concepts.training_sizes(square, [c], None, settings)
    assert not on and set(sizes.values()) == {(64, 64)}
    mixed = scan_images(_folder(tmp_path / "mixed", MIXED), instance_prompt="x")
    sizes, on, scales = concepts.training_sizes(mixed, [c], None, settings)
    assert on and len(set(sizes.values())) >= 3
    by_name = {Path(u).stem: s for u, s in sizes.items()}
    assert by_name["portrait"][0] < by_name["portrait"][1] and by_name["landscape"][0] > by_name["landscape"][1]
    assert scales["instance/tiny.png"] > bk.MAX_UPSCALE > scales["instance/huge.png"]
    off, on_off, _ = concepts.training_sizes(mixed, [c], False, settings)
    assert not on_off and set(off.values()) == {(64, 64)}  # --no-enable_bucket: today's square crops
    warning = bk.upscale_warning({str(ex.path): scales[ex.uid] for ex in mixed})
    assert "tiny.png" in warning and "huge.png" not in warning and f"{bk.MAX_UPSCALE}x" in warning
    assert "\n" not in warning


def test_one_bucket_per_batch_every_item_once_per_epoch_deterministic():
    sizes = [(64, 80)] * 5 + [(80, 64)] * 3 + [(64, 64)] * 4
    order = DataOrder(sizes, batch=2, processes=1, seed=3)
    assert order.batches_per_epoch == 3 + 2 + 2  # each bucket keeps its partial batch
    for epoch in range(3):
        batches = [order.items(m, 0) for m in range(epoch * 7, epoch * 7 + 7)]
        assert all(len({sizes[i] for i in b}) == 1 for b in batches)  # one bucket per batch
        assert sorted(i for b in batches for i in b) == list(range(12))
    again = DataOrder(sizes, batch=2, processes=1, seed=3)
    assert [order.items(m, 0) for m in range(21)] == [again.items(m, 0) for m in range(21)]
    assert [order.items(m, 0) for m in range(7)] != [DataOrder(sizes, 2, 1, 4).items(m, 0) for m in range(7)]
    assert order.shapes() == {((64, 80), 2), ((64, 80), 1), ((80, 64), 2), ((80, 64), 1), ((64, 64), 2)}


def test_epoch_with_prior_is_max_of_instances_and_classes_and_classes_take_their_pairs_size():
    ex = [Example(f"{i}.png", Path(f"{i}.png"), "c", "x") for i in range(3)]
    cls = [Example(f"c{i}.png", Path(f"c{i}.png"), "k", "class_prompt", is_class=True) for i in range(10)]
    sizes = {ex[0].uid: (64, 80), ex[1].uid: (80, 64), ex[2].uid: (64, 64)}
    concept = concepts.Concept("d", repeats=2, class_data_dir="k", class_prompt="k")
    items = concepts.pair_items(ex, cls, [concept], sizes)
    assert len(items) == max(3 * 2, 10)
    assert [it.instance for it in items] == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1]  # item i: instance (i mod 6) // 2
    assert [it.cls for it in items] == list(range(10))
    assert all(it.size == sizes[ex[it.instance].uid] for it in items)
    wanted = concepts.class_position_sizes([sizes[e.uid] for e in ex], 2, 10)
    assert wanted == [it.size for it in items]  # generated class images are drawn at their pair's size
    no_prior = concepts.pair_items(ex, cls, [concepts.Concept("d", repeats=2)], sizes)
    assert len(no_prior) == 6 and all(it.cls is None for it in no_prior)


def test_latent_keys_carry_the_bucket_and_square_keys_stay_as_before(tmp_path):
    (path,) = _folder(tmp_path, {"a": (60, 80)}).glob("*.png")
    d = file_digest(path)
    square = cache_latents.LatentSpec(64, False, False)
    keys = {
        b: cache_latents.latent_key(d, cache_latents.LatentSpec(64, False, False, bucket=b), "vae", "float32@cpu")
        for b in [(48, 80), (64, 64), (80, 48)]
    }
    assert len(set(keys.values())) == 3
    assert cache_latents.latent_key(d, square, "vae", "float32@cpu") not in keys.values()
    old = content_key(kind="latent", image=d, res=64, center_crop=False, flip=False, tiled=False, vae="vae",
                      numerics="float32@cpu")  # fmt: skip
    assert cache_latents.latent_key(d, square, "vae", "float32@cpu") == old  # earlier caches stay valid
    px = cache_latents.LatentSpec(64, True, False, bucket=(48, 80)).pixels(path)
    assert px.shape == (3, 80, 48)


def test_planner_plans_for_the_largest_bucket(tiny_model):
    from sd3booth.config import TrainConfig
    from sd3booth.plan.choose import Machine, Workload, plan_for_config

    base = dict(resolution=1024, batch=1, t5_len=77, rank=4, lora_params=1, optimizer="adamw", validation=False,
                class_images=False)  # fmt: skip
    assert Workload(**base).tokens == 4096 + 154
    assert Workload(**base, train_size=(896, 1152)).tokens == 56 * 72 + 154
    s = bk.BucketSettings(step=64)
    one = concepts.Concept("a", resolution=1000)
    w, h = concepts.largest_size([one], True, s)
    assert w * h == max(a * b for a, b in bk.bucket_sizes(1000, s)) > 960 * 960  # not the square bucket (960)
    assert concepts.largest_size([one, concepts.Concept("b", resolution=1024)], None, s) == (1024, 1024)
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_model), instance_data_dir="x", resolution=64)
    small, _ = plan_for_config(cfg, tiny_model, Machine(24.0), train_size=(64, 64))
    large, _ = plan_for_config(cfg, tiny_model, Machine(24.0), train_size=(128, 192))
    assert large.predicted["training"] > small.predicted["training"]


def test_compiled_blocks_compile_each_shape_once_or_once_for_all():
    """With buckets the token count changes between steps; no step after a shape's first may recompile."""
    from torch._dynamo.testing import CompileCounter

    from sd3booth.models import speed

    shapes = [(1, 12, 8), (1, 20, 8), (2, 12, 8), (1, 12, 8), (1, 20, 8), (2, 12, 8)] * 3
    for mode, n_shapes in (("static", 3), ("dynamic", 3)):
        torch._dynamo.reset()
        block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        counter = CompileCounter()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(speed.SHAPES_ENV, mode)
            compiled = speed.CompiledBlocks([block], backend=counter, shapes=n_shapes)
        assert compiled.dynamic == (mode == "dynamic")
        counts = []
        for s in shapes:
            block(torch.randn(*s))
            counts.append(counter.frame_count)
        assert counts[3:] == [counts[2]] * (len(shapes) - 3)  # nothing compiles after each shape was seen once
        assert counts[-1] <= (3 if mode == "static" else 2)
    assert not speed.dynamic_shapes(speed.MAX_STATIC_SHAPES) and speed.dynamic_shapes(speed.MAX_STATIC_SHAPES + 1)


def test_mixed_aspect_folder_trains_and_the_lora_loads(tiny_model, tmp_path, capsys):
    """Portrait, landscape, square, tiny and huge images: buckets switch on, the table and the upscale warning
    are printed, no image is cropped by more than one step, validation uses --width/--height, and the LoRA
    loads in diffusers with every key in the transformer.-prefixed format ComfyUI reads."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    data = _folder(tmp_path / "photos", MIXED)
    out = tmp_path / "run"
    args = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64",
            "--bucket_reso_steps", "16", "--train_batch_size", "2", "--max_train_steps", "3", "--seed", "0",
            "--report_to", "none", "--rank", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--validation_prompt", "sks toy", "--num_validation_images", "1", "--num_inference_steps", "1",
            "--width", "48", "--height", "80", "--validation_steps", "100"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "aspect-ratio buckets (step 16 px" in captured.out and "tiny.png (2." in captured.err
    table = bk.bucket_sizes(64, bk.BucketSettings(step=16))
    for name, size in MIXED.items():
        bucket = bk.nearest_bucket(size, table, 16)
        assert f"{bucket[0]}x{bucket[1]}" in captured.out, name
        assert bk.overhang(size, bucket) <= 16, name
    (png,) = (out / "validation" / "step-3").glob("*.png")
    assert Image.open(png).size == (48, 80)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.transformer_blocks.") for k in lora)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    assert pipe.transformer.peft_config
    lat = Counter(p.name for p in (out / "cache" / "latents").glob("*.safetensors"))
    assert len(lat) == len(MIXED)  # one latent per image, at its own bucket
    gen = tmp_path / "gen"
    assert main(["generate", "--lora", str(out / "pytorch_lora_weights.safetensors"), "--prompt", "sks toy",
                 "--num_images", "1", "--num_inference_steps", "1", "--width", "80", "--height", "48",
                 "--output_dir", str(gen), "--cache_dir", str(out / "cache")]) == 0  # fmt: skip
    assert Image.open(gen / "image-000.png").size == (80, 48)
