"""The real entry point end to end on a tiny random SD3: train -> load in diffusers -> generate; exact resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

from sd3booth.cli import main
from sd3booth.data.dataset import write_demo_like_dataset

FAST = [
    "--resolution",
    "64",
    "--num_inference_steps",
    "2",
    "--report_to",
    "none",
    "--seed",
    "0",
    "--rank",
    "4",
    "--learning_rate",
    "1e-3",
    "--lr_warmup_steps",
    "0",
]


def mixed_caption_dataset(root: Path) -> Path:
    """5 images: 2 captioned by metadata.jsonl, 2 by .txt sidecars, 1 by --instance_prompt."""
    write_demo_like_dataset(root, n=5, size=80)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (root / "toy_02.txt").write_text("a photo of sks toy from a txt file\n")
    (root / "toy_03.txt").write_text("another sks toy caption\n")
    return root


def pipe_images(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images


def test_cli_train_prior_validation_checkpoint_resume_then_load_and_generate(tiny_model, tmp_path):
    data = mixed_caption_dataset(tmp_path / "photos")
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "sd3booth",
        "train",
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a photo of sks toy",
        "--output_dir",
        str(out),
        "--train_batch_size",
        "2",
        "--with_prior_preservation",
        "--class_data_dir",
        str(tmp_path / "class"),
        "--class_prompt",
        "a photo of a toy",
        "--num_class_images",
        "3",
        "--validation_prompt",
        "sks toy",
        "--num_validation_images",
        "2",
        "--logging_steps",
        "2",
        "--validation_steps",
        "3",
        "--checkpointing_steps",
        "3",
        "--checkpoints_total_limit",
        "2",
        "--random_flip",
        "--report_to",
        "tensorboard",
        *FAST[2:4],
        *FAST[6:],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([*args, "--max_train_steps", "6"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 3  # generated and kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (out / "validation" / "step-3").is_dir() and len(list((out / "validation" / "step-6").glob("*.png"))) == 2
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs by default"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]  # every --logging_steps
    assert set(metrics[0]) >= {"step", "loss", "lr", "s_per_step", "peak_gpu_gib"}
    stages = [s["stage"] for s in json.loads((out / "stages.json").read_text())]
    assert stages[:3] == ["text encoder CLIP-L", "text encoder CLIP-G", "text encoder T5 (bf16)"]
    assert "class images" in stages and "VAE encode" in stages and "training" in stages
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["rank"] == 4 and settings["with_prior_preservation"] is True

    # resume to 9 steps: continues at 6, keeps the limit of 2 checkpoints, encodes nothing again
    second = subprocess.run(
        [*args, "--max_train_steps", "9", "--resume_from_checkpoint", "latest"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr and "encoding" not in second.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-9"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 9

    # the LoRA loads in diffusers with every key used, and changes the output
    lora_file = out / "pytorch_lora_weights.safetensors"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    base = pipe_images(pipe)
    pipe.load_lora_weights(str(lora_file))
    (adapter,) = pipe.transformer.peft_config
    from peft.utils import get_peft_model_state_dict

    assert {f"transformer.{k}" for k in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)} == set(
        load_file(lora_file)
    )
    assert (pipe_images(pipe) - base).abs().max() > 1e-3

    # generate through the CLI, base model taken from settings.json beside the LoRA
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd3booth",
            "generate",
            "--lora",
            str(lora_file),
            "--prompt",
            "sks toy",
            "--num_images",
            "2",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(tmp_path / "gen"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["image-000.png", "image-001.png"]


def _train(tiny_model, data, out, *extra):
    args = [
        "train",
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--instance_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--cache_dir",
        str(out.parent / "cache"),
        *FAST,
        *extra,
    ]
    assert main(args) == 0


@pytest.mark.parametrize("variant", ["interrupted", "extended"])
def test_resume_is_bit_identical_on_cpu(tiny_model, tmp_path, variant):
    """N steps straight == k steps + resume to N: same LoRA bits (data order, noise, dropout, optimizer, LR)."""
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=80)
    common = [
        "--train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--random_flip",
        "--lora_dropout",
        "0.1",
        "--with_prior_preservation",
        "--class_data_dir",
        str(tmp_path / "class"),
        "--class_prompt",
        "a toy",
        "--num_class_images",
        "2",
        "--checkpointing_steps",
        "3",
        "--max_grad_norm",
        "0.5",
    ]
    sched = ["--lr_scheduler", "cosine"] if variant == "interrupted" else ["--lr_scheduler", "constant"]
    _train(tiny_model, data, tmp_path / "straight", *common, *sched, "--max_train_steps", "6")
    resumed = tmp_path / "resumed"
    if variant == "interrupted":  # a run killed after checkpoint-3, then the same command with --resume
        resumed.mkdir()
        shutil.copy(tmp_path / "straight" / "settings.json", resumed / "settings.json")
        shutil.copytree(
            tmp_path / "straight" / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3"
        )
    else:  # a finished 3-step run, extended to 6
        _train(tiny_model, data, resumed, *common, *sched, "--max_train_steps", "3")
    _train(tiny_model, data, resumed, *common, *sched, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def rgba_mixed_aspect_dataset(root: Path) -> Path:
    """Portrait, landscape, square and small RGBA images (alpha: an opaque rectangle on transparency)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, (w, h) in {"portrait": (60, 84), "landscape": (120, 72), "square": (70, 70), "small": (40, 56)}.items():
        px = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        px[..., 3] = 0
        px[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 3] = 255
        Image.fromarray(px, "RGBA").save(root / f"{name}.png")
    return root


def test_resume_with_buckets_masks_and_caption_dropout_is_bit_identical(tiny_model, tmp_path):
    """The bucket variant of the test above: mixed aspect ratios (several buckets, partial batches, class images
    paired into each bucket), alpha-masked loss, caption dropout, random latent crops and flips, epochs crossed;
    a run killed after checkpoint-3 and resumed equals the straight run bit for bit."""
    data = rgba_mixed_aspect_dataset(tmp_path / "photos")
    common = ["--instance_prompt", "a photo of sks toy", "--train_batch_size", "2", "--gradient_accumulation_steps",
              "2", "--random_flip", "--lora_dropout", "0.1", "--bucket_reso_steps", "16", "--with_prior_preservation",
              "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a toy", "--num_class_images", "3",
              "--masked_loss", "--alpha_mask", "--caption_dropout_rate", "0.5", "--checkpointing_steps", "3",
              "--lr_scheduler", "cosine"]  # fmt: skip
    _train(tiny_model, data, tmp_path / "straight", *common, "--max_train_steps", "6")
    settings = json.loads((tmp_path / "straight" / "settings.json").read_text())["settings"]
    assert settings["enable_bucket"] is None  # auto: switched on by the mixed aspect ratios
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "straight" / "settings.json", resumed / "settings.json")
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    _train(tiny_model, data, resumed, *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    sizes = {Image.open(p).size for p in (tmp_path / "class").glob("*.png")}
    assert len(sizes) > 1  # class images were drawn at the sizes of the buckets they are paired into


def test_prepare_command_caches_everything_then_train_encodes_nothing(tiny_model, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    base = [
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--instance_data_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "1",
        "--center_crop",
        *FAST,
    ]
    assert main(["prepare", *base]) == 0
    assert "encoding" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "cache" / "text").glob("*.safetensors"))) == 3  # 2 captions + negative
    assert len(list((tmp_path / "out" / "cache" / "latents").glob("*.safetensors"))) == 2
    assert main(["train", *base]) == 0
    assert "encoding" not in capsys.readouterr().out


def test_demo_runs_and_reports(tmp_path, capsys):
    from sd3booth.demo import run_demo

    lora_path = run_demo(tmp_path / "demo")
    out = capsys.readouterr().out
    assert lora_path.is_file() and "sd3booth demo: done" in out
    assert len(list((tmp_path / "demo" / "run" / "validation").rglob("*.png"))) >= 2


def test_dataset_name_accepts_a_local_imagefolder(tiny_model, tmp_path):
    data = tmp_path / "folder_dataset"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--pretrained_model_name_or_path",
                str(tiny_model),
                "--dataset_name",
                str(data),
                "--output_dir",
                str(out),
                "--train_batch_size",
                "1",
                "--max_train_steps",
                "1",
                *FAST,
            ]
        )
        == 0
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_memory_savers_do_not_change_the_lora(tiny_model, tmp_path):
    """Selective checkpointing and activation offload change memory, never the trained bits; block swap moves
    weights through other buffers, which may change the last bit of a matmul (6e-8 after 3 Adam steps here).

    (VAE tiling does change latents slightly, so tiled latents are cached under their own keys.)"""
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    common = ["--train_batch_size", "1", "--max_train_steps", "3"]
    _train(tiny_model, data, tmp_path / "plain", *common)
    _train(tiny_model, data, tmp_path / "ckpt", *common, "--checkpoint_blocks", "1", "--activation_offload")
    _train(tiny_model, data, tmp_path / "swap", *common, "--blocks_to_swap", "2", "--checkpoint_blocks", "2")
    plan = json.loads((tmp_path / "swap" / "plan.json").read_text())
    assert (plan["swap_blocks"], plan["checkpoint_blocks"]) == (2, 2)
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors")
    c = load_file(tmp_path / "swap" / "pytorch_lora_weights.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6)
