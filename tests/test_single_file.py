"""Single-file SD3 checkpoints: written from the tiny model in Stability's layout, loaded back with and without
bundled encoders and with a separate fp8 T5 file; cache identities from content; one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd3booth.cli import main
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import UserError
from sd3booth.models import single_file
from sd3booth.models.source import resolve_model
from sd3booth.single_file_writer import write_encoder_file, write_single_file

FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD3BOOTH_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_weights(a, b, folders=FOLDERS, fp8=()):
    for sub in folders:
        wa, wb = _weights(a / sub), _weights(b / sub)
        assert set(wa) == set(wb), sub
        for k, v in wa.items():
            want = v.to(torch.float8_e4m3fn).float() if sub in fp8 and v.ndim == 2 else v.float()
            torch.testing.assert_close(wb[k].float(), want, rtol=1e-2 if sub in fp8 else 0, atol=0, msg=f"{sub}/{k}")


def test_bundled_single_file_loads_as_the_original_model(tiny_model, tmp_path, model_cache):
    f = write_single_file(tiny_model, tmp_path / "sd3_incl_clips_t5.safetensors")
    keys = set(load_file(f))
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys  # Stability's layout
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "text_encoders.t5xxl.transformer.shared.weight" in keys
    src = resolve_model(str(f), single_file_config=str(tiny_model))
    _assert_same_weights(tiny_model, src.root)  # transformer and VAE via diffusers' from_single_file
    assert src.root.parent == model_cache and src.name == str(f.resolve())
    again = resolve_model(str(f), single_file_config=str(tiny_model))  # found again, not converted again
    assert again.root == src.root and again.identities == src.identities


def test_encoders_in_files_of_their_own_with_an_fp8_t5(tiny_model, tmp_path, model_cache, capsys):
    f = write_single_file(tiny_model, tmp_path / "sd3_medium.safetensors", encoders=())
    clip_l = write_encoder_file(tiny_model, "clip_l", tmp_path / "clip_l.safetensors")
    clip_g = write_encoder_file(tiny_model, "clip_g", tmp_path / "clip_g.safetensors")
    t5 = write_encoder_file(tiny_model, "t5xxl", tmp_path / "t5xxl_fp8_e4m3fn.safetensors", fp8=True)
    assert {v.dtype for v in load_file(t5).values() if v.ndim == 2} == {torch.float8_e4m3fn}
    src = resolve_model(
        str(f), clip_l=str(clip_l), clip_g=str(clip_g), t5xxl=str(t5), single_file_config=str(tiny_model)
    )
    _assert_same_weights(tiny_model, src.root, fp8=("text_encoder_3",))
    t5_weights = _weights(src.root / "text_encoder_3")
    assert {v.dtype for v in t5_weights.values()} == {torch.bfloat16}  # widened for transformers
    scaled = write_encoder_file(tiny_model, "t5xxl", tmp_path / "t5_scaled.safetensors", fp8=True, scaled=True)
    src2 = resolve_model(
        str(f), clip_l=str(clip_l), clip_g=str(clip_g), t5xxl=str(scaled), single_file_config=str(tiny_model)
    )
    for k, v in _weights(tiny_model / "text_encoder_3").items():
        torch.testing.assert_close(_weights(src2.root / "text_encoder_3")[k].float(), v.float(), rtol=0.07, atol=1e-3)
    # missing CLIP: one line naming the flag
    with pytest.raises(UserError, match="has no CLIP-L text encoder; pass its file with --clip_l"):
        resolve_model(str(f), single_file_config=str(tiny_model))


def test_identity_comes_from_content_not_paths(tiny_model, tmp_path, model_cache):
    f = write_single_file(tiny_model, tmp_path / "a" / "model.safetensors")
    copy = tmp_path / "b" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(f, copy)
    os.utime(copy, (1, 1))
    a = resolve_model(str(f), single_file_config=str(tiny_model))
    b = resolve_model(str(copy), single_file_config=str(tiny_model))
    assert a.identities == b.identities and a.root == b.root
    state = load_file(f)
    key = "model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"
    state[key] = state[key] + 1e-3  # a fine-tune of one layer: same header, same size
    tuned = tmp_path / "c" / "model.safetensors"
    tuned.parent.mkdir()
    save_file(state, tuned, metadata={"format": "pt"})
    assert tuned.stat().st_size == f.stat().st_size
    c = resolve_model(str(tuned), single_file_config=str(tiny_model))
    ids_a, ids_c = dict(a.identities), dict(c.identities)
    assert ids_a["transformer"] != ids_c["transformer"] and c.root != a.root
    assert ids_a["vae"] == ids_c["vae"] and ids_a["text_encoder"] == ids_c["text_encoder"]  # latents stay cached


def _one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_files_that_are_not_sd3_are_one_line_errors(tiny_model, tmp_path, model_cache, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "sdxl.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02pickle")
    base = ["train", "--instance_data_dir", str(data), "--output_dir", str(tmp_path / "o")]
    err = _one_line(capsys, [*base, "--pretrained_model_name_or_path", str(tmp_path / "sdxl.safetensors")])
    assert "is not an SD3 checkpoint" in err
    assert "pickle checkpoint" in _one_line(
        capsys, [*base, "--pretrained_model_name_or_path", str(tmp_path / "old.ckpt")]
    )
    f = write_single_file(tiny_model, tmp_path / "sd3.safetensors")
    other = tmp_path / "other_config"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    err = _one_line(capsys, [*base, "--pretrained_model_name_or_path", str(f), "--single_file_config", str(other)])
    assert "do not fit the single file" in err and "num_layers 3 (file: 2)" in err
    err = _one_line(capsys, [*base, "--pretrained_model_name_or_path", str(f)])  # tiny: no Stability repo matches
    assert "--single_file_config" in err
    noenc = write_single_file(tiny_model, tmp_path / "noenc.safetensors", encoders=("clip_l", "clip_g"))
    err = _one_line(
        capsys, [*base, "--pretrained_model_name_or_path", str(noenc), "--single_file_config", str(tiny_model)]
    )
    assert "no T5-XXL encoder: pass --t5xxl" in err


def test_a_known_model_offline_without_configs_says_what_to_pass():
    shape = single_file.TransformerShape(24, 1536, 192, (), False)  # SD3 Medium
    assert shape.arch == "sd3-medium"
    with pytest.raises(UserError, match="stable-diffusion-3-medium-diffusers.*--single_file_config DIR"):
        single_file.resolve_config_source(None, shape)  # HF_HUB_OFFLINE=1 in the tests, nothing cached


def test_train_and_generate_from_single_files(tiny_model, tmp_path, model_cache, capsys):
    f = write_single_file(tiny_model, tmp_path / "sd3.safetensors", encoders=("clip_l", "clip_g"))
    t5 = write_encoder_file(tiny_model, "t5xxl", tmp_path / "t5xxl_fp8_e4m3fn.safetensors", fp8=True)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp_path / "run"
    argv = ["train", "--pretrained_model_name_or_path", str(f), "--t5xxl", str(t5), "--single_file_config",
            str(tiny_model), "--instance_data_dir", str(data), "--output_dir", str(out), "--resolution", "64",
            "--max_train_steps", "1", "--center_crop", "--train_batch_size", "1", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["t5xxl"] == str(t5.resolve()) and settings["pretrained_model_name_or_path"] == str(f.resolve())
    capsys.readouterr()
    lora_file = out / "pytorch_lora_weights.safetensors"
    gen = ["generate", "--lora", str(lora_file), "--prompt", "", "--num_images", "1", "--num_inference_steps", "1",
           "--output_dir", str(tmp_path / "gen"), "--cache_dir", str(out / "cache")]  # fmt: skip
    assert main(gen) == 0  # the base model, its encoder files and the config source come from settings.json
    assert "encoding" not in capsys.readouterr().out  # the same identities: train's text cache is reused
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
