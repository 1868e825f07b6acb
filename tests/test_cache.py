"""Text and latent caches: equal to the pipeline's own maths, encoded once, keyed by content."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd3booth.cache import latents as cache_latents
from sd3booth.cache import text as cache_text
from sd3booth.data import dataset
from sd3booth.models import loaders
from sd3booth.models.placement import DeviceInfo, decide
from sd3booth.models.source import resolve_model
from sd3booth.plan.choose import Plan

CPU = torch.device("cpu")


@pytest.fixture()
def place():
    return decide(DeviceInfo(), "no", Plan(t5="bf16"))


def test_text_embeddings_equal_pipeline_encode_prompt(tiny_model, tmp_path, place):
    src = resolve_model(str(tiny_model))
    captions = ["a photo of sks toy", "a red disc on a table"]
    keys = cache_text.ensure_text_embeddings(captions, src, place, tmp_path, 77, log=lambda m: None)
    emb = cache_text.load_text_embeddings(keys.values(), tmp_path, torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    for c in captions:
        pe, _, pooled, _ = pipe.encode_prompt(
            c, c, c, device=CPU, do_classifier_free_guidance=False, max_sequence_length=77
        )
        torch.testing.assert_close(emb[keys[c]].prompt_embeds, pe[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb[keys[c]].pooled, pooled[0], rtol=1e-5, atol=1e-5)
    assert emb[keys[captions[0]]].prompt_embeds.shape == (77 + 77, 64)


def test_t5_none_gives_zeros_like_the_pipeline_without_t5(tiny_model, tmp_path):
    src = resolve_model(str(tiny_model))
    place = decide(DeviceInfo(), "no", Plan(t5="none"))
    keys = cache_text.ensure_text_embeddings(["x"], src, place, tmp_path, 32, log=lambda m: None)
    pe = cache_text.load_text_embeddings(keys.values(), tmp_path, torch.float32)[keys["x"]].prompt_embeds
    assert pe.shape == (77 + 32, 64) and torch.count_nonzero(pe[77:]) == 0


def test_each_distinct_caption_is_encoded_once(tiny_model, tmp_path, place, monkeypatch):
    src = resolve_model(str(tiny_model))
    loads = []
    real = loaders.load_text_encoder
    monkeypatch.setattr(loaders, "load_text_encoder", lambda s, i, p: loads.append(i) or real(s, i, p))
    encoded = []
    real_clip = cache_text._clip_embed
    monkeypatch.setattr(
        cache_text, "_clip_embed", lambda t, e, caps, d: encoded.extend(caps) or real_clip(t, e, caps, d)
    )
    cache_text.ensure_text_embeddings(["a", "b", "a", "b", "a"], src, place, tmp_path, 77, log=lambda m: None)
    assert loads == [1, 2, 3]  # one at a time, in order
    assert sorted(encoded) == ["a", "a", "b", "b"]  # each caption once per CLIP encoder
    cache_text.ensure_text_embeddings(["b", "a"], src, place, tmp_path, 77, log=lambda m: None)
    assert loads == [1, 2, 3]  # all cached: no encoder loaded again
    cache_text.ensure_text_embeddings(["a", "c"], src, place, tmp_path, 77, log=lambda m: None)
    assert loads == [1, 2, 3, 1, 2, 3] and encoded[-2:] == ["c", "c"]  # only the new caption


def test_latents_are_keyed_by_content_not_name_or_position(tiny_model, tmp_path, place, monkeypatch):
    src = resolve_model(str(tiny_model))
    d = tmp_path / "data"
    dataset.write_demo_like_dataset(d, n=3, size=80)
    spec = [cache_latents.LatentSpec(64, False, False), cache_latents.LatentSpec(64, False, True)]
    ex = dataset.scan_images(d)
    keys = cache_latents.ensure_latents([(e, sp) for e in ex for sp in spec], src, place, tmp_path / "c", log=print)
    assert len(set(keys.values())) == 6
    # renamed copy: same content, same keys, and the VAE is not loaded again
    loads = []
    monkeypatch.setattr(loaders, "load_vae", lambda *a: loads.append(1))
    (d / "toy_00.png").rename(d / "zz_renamed.png")
    meta = (d / "metadata.jsonl").read_text().replace("toy_00.png", "zz_renamed.png")
    (d / "metadata.jsonl").write_text(meta)
    ex2 = dataset.scan_images(d)
    keys2 = cache_latents.ensure_latents([(e, sp) for e in ex2 for sp in spec], src, place, tmp_path / "c", print)
    assert loads == []
    square = (64, 64)
    assert keys2[("instance/zz_renamed.png", square, False)] == keys[("instance/toy_00.png", square, False)]
    # changed content: a new key
    d2 = tmp_path / "d2"
    dataset.write_demo_like_dataset(d2, n=1, size=80, seed=5)
    other = dataset.scan_images(d2)[0]
    k_other = cache_latents.latent_key(dataset.file_digest(other.path), spec[0], src.identity("vae"), "float32@cpu")
    assert k_other not in keys.values()


def test_cached_latent_distribution_equals_direct_vae_encode(tiny_model, tmp_path, place):
    src = resolve_model(str(tiny_model))
    d = tmp_path / "data"
    (path,) = dataset.write_demo_like_dataset(d, n=1, size=64)
    spec = cache_latents.LatentSpec(64, True, True)
    jobs = [(ex, spec) for ex in dataset.scan_images(d)]
    keys = cache_latents.ensure_latents(jobs, src, place, tmp_path / "c", log=lambda m: None)
    mean, std = cache_latents.load_latents(list(keys.values()), tmp_path / "c")[
        keys[("instance/toy_00.png", (64, 64), True)]
    ]
    vae = loaders.load_vae(src, place)
    px = dataset.to_tensor(dataset.resize_and_crop(dataset.load_image(path), 64, True), flip=True)[None]
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
    torch.testing.assert_close(mean, dist.mean[0])
    torch.testing.assert_close(std, dist.std[0])
    assert mean.shape == (16, 8, 8)
