"""Runs that read and write other tools' files: generate with several LoRAs in any layout, --init_lora, and
what a finished run leaves (precision, metadata, model card, file modes, portable settings.json)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from lora_helpers import write_trained_lora  # noqa: I001
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd3booth.adapters import layouts
from sd3booth.cli import main
from sd3booth.data.dataset import write_demo_like_dataset


def _generate(tiny_model, out, *loras, extra=()):
    argv = ["generate", "--pretrained_model_name_or_path", str(tiny_model), "--prompt", "a toy", "--num_images", "1",
            "--num_inference_steps", "2", "--width", "64", "--height", "32", "--output_dir", str(out),
            "--cache_dir", str(out.parent / "gencache"), *extra]  # fmt: skip
    for spec in loras:
        argv += ["--lora", spec]
    assert main(argv) == 0
    return np.asarray(Image.open(out / "image-000.png"), dtype=np.int16)


def test_generate_mixes_loras_in_any_layout(tiny_model, tmp_path):
    a = write_trained_lora(tiny_model, tmp_path / "a.safetensors", seed=1)
    b = write_trained_lora(tiny_model, tmp_path / "b.safetensors", layers=["attn.to_q", "ff.net.2"], rank=2, seed=2)
    a_kohya, a_comfy = tmp_path / "a_kohya.safetensors", tmp_path / "a_comfy.safetensors"
    assert main(["lora", "convert", str(a), str(a_kohya), "--to", "kohya"]) == 0
    assert main(["lora", "convert", str(a), str(a_comfy), "--to", "comfyui"]) == 0
    base = _generate(tiny_model, tmp_path / "base")
    assert base.shape == (32, 64, 3)  # --height 32 --width 64
    with_a = _generate(tiny_model, tmp_path / "a", str(a))
    assert np.abs(with_a - base).max() > 0  # the LoRA changes the image
    for other in (a_kohya, a_comfy):  # the same LoRA in kohya's or ComfyUI's layout draws the same image
        assert np.abs(_generate(tiny_model, tmp_path / other.stem, str(other)) - with_a).max() <= 1
    assert np.array_equal(_generate(tiny_model, tmp_path / "a0", f"{a}:0"), base)  # weight 0: no change
    mixed = _generate(tiny_model, tmp_path / "mix", f"{a_kohya}:0.7", f"{b}:0.5")
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", f"{a}:0.7", f"{b}:0.5", "-o", str(merged), "--save_precision", "fp32"]) == 0
    assert np.abs(_generate(tiny_model, tmp_path / "merged", str(merged)) - mixed).max() <= 1
    assert np.abs(mixed - with_a).max() > 0


def _one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_generate_input_errors_are_one_line(tiny_model, tmp_path, capsys):
    a = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=["attn.to_q"])
    d = layouts.read_lora(a).modules["transformer.transformer_blocks.0.attn.to_q"]
    foreign = tmp_path / "sd35.safetensors"  # block 30: a LoRA of a deeper SD3
    save_file({"transformer.transformer_blocks.30.attn.to_q.lora_A.weight": d[0],
               "transformer.transformer_blocks.30.attn.to_q.lora_B.weight": d[1]}, foreign)  # fmt: skip
    base = ["generate", "--pretrained_model_name_or_path", str(tiny_model), "--prompt", "x", "--output_dir",
            str(tmp_path / "g"), "--num_inference_steps", "1", "--num_images", "1"]  # fmt: skip
    assert "multiple of 16" in _one_line(capsys, [*base, "--lora", str(a), "--width", "50"])
    assert "does not exist" in _one_line(capsys, [*base, "--lora", str(tmp_path / "missing.safetensors")])
    assert "is a folder" in _one_line(capsys, [*base, "--lora", str(tmp_path)])
    assert "do not fit this model" in _one_line(capsys, [*base, "--lora", str(foreign), "--resolution", "64"])
    assert "at least 1" in _one_line(capsys, [*base, "--num_images", "0"])
    assert "no base model" in _one_line(capsys, ["generate", "--prompt", "x", "--lora", str(a)])


def _train(tiny_model, data, out, *extra):
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "1", "--center_crop",
            "--train_batch_size", "1", "--report_to", "none", "--seed", "0", *extra]  # fmt: skip
    assert main(argv) == 0


@pytest.mark.parametrize("rank", [4, 2, 8])
def test_init_lora_starts_from_a_kohya_file(tiny_model, tmp_path, capsys, rank):
    """The run starts from the file's weight change (exact at the same or a higher rank, the best rank-2 cut
    below), trains exactly the file's layers, and reports the cut."""
    src = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=["attn.to_q", "attn.to_k"], rank=4)
    kohya = tmp_path / "a_kohya.safetensors"
    assert main(["lora", "convert", str(src), str(kohya), "--to", "kohya", "--save_precision", "fp32"]) == 0
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    out = tmp_path / "run"
    capsys.readouterr()
    _train(tiny_model, data, out, "--init_lora", str(kohya), "--rank", str(rank), "--learning_rate", "1e-12",
           "--save_precision", "fp32", "--lora_alpha", "16")  # fmt: skip
    printed = capsys.readouterr().out
    assert "starting from --init_lora: 4 layers of rank 4" in printed and (("cut to rank 2" in printed) == (rank == 2))
    start = layouts.read_lora(src).modules
    trained = layouts.read_lora(out / "pytorch_lora_weights.safetensors").modules
    assert set(trained) == set(start)  # the file's layers, not the default attention set
    for name, (d, u) in start.items():
        want = layouts.delta(d, u)
        if rank == 2:
            uu, s, vh = torch.linalg.svd(want.double(), full_matrices=False)
            want = ((uu[:, :2] * s[:2]) @ vh[:2]).float()
        torch.testing.assert_close(layouts.delta(*trained[name]), want, rtol=1e-4, atol=1e-5)


def test_init_lora_outside_lora_layers_is_one_line(tiny_model, tmp_path, capsys):
    src = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=["ff.net.2"])
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(tmp_path / "o"), "--train_batch_size", "1", "--init_lora", str(src),
            "--lora_layers", "attn.to_q"]  # fmt: skip
    assert "outside --lora_layers" in _one_line(capsys, argv)


def test_what_a_run_leaves(tiny_model, tmp_path, monkeypatch):
    """bf16 by default, metadata in the header, the ComfyUI file beside the diffusers one (same change), a hub
    model card with the validation images, files readable by others (umask 022), absolute paths in settings.json
    that work from another folder."""
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        _train(tiny_model, "photos", "run", "--instance_prompt", "a photo of sks toy", "--validation_prompt",
               "sks toy on a beach", "--num_validation_images", "2", "--num_inference_steps", "1",
               "--lora_format", "comfyui", "--checkpointing_steps", "1", "--cache_dir", "cache")  # fmt: skip
    finally:
        os.umask(old)
    out = tmp_path / "run"
    path = out / "pytorch_lora_weights.safetensors"
    assert {v.dtype for v in load_file(path).values()} == {torch.bfloat16}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["sd3booth.base_model"] == str(tiny_model.resolve()) and meta["sd3booth.rank"] == "4"
    assert meta["sd3booth.steps"] == "1" and meta["sd3booth.instance_prompt"] == "a photo of sks toy"
    assert meta["sd3booth.resolution"] == "64" and meta["sd3booth.type"] == "lora" and "sd3booth.version" in meta
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora" and meta["ss_network_dim"] == "4"
    comfy = layouts.read_lora(out / "lora_comfyui.safetensors")
    assert comfy.format == "comfyui"
    for name, (d, u) in layouts.read_lora(path).modules.items():
        # the last block's context query gets no gradient (its output is dropped): zero there, left out on split
        got = layouts.delta(*comfy.modules[name]) if name in comfy.modules else torch.zeros(u.shape[0], d.shape[1])
        torch.testing.assert_close(got, layouts.delta(d, u), rtol=1e-2, atol=1e-3)
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == "a photo of sks toy" and "lora" in card.data.tags
    urls = [w["output"]["url"] for w in card.data.widget]
    assert urls == ["validation/step-1/000.png", "validation/step-1/001.png"] and all((out / u).is_file() for u in urls)
    assert "<Gallery />" in card.text and "load_lora_weights" in card.text
    for p in [*out.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
    settings = json.loads((out / "settings.json").read_text())["settings"]
    for key in ("instance_data_dir", "output_dir", "cache_dir", "pretrained_model_name_or_path"):
        assert os.path.isabs(settings[key]), key
    monkeypatch.chdir(tiny_model)  # the settings file works from anywhere
    assert main(["train", "--config", str(out / "settings.json"), "--output_dir", str(tmp_path / "again"),
                 "--max_train_steps", "1", "--validation_prompt", "", "--lora_format", "diffusers"]) == 0  # fmt: skip
