"""Every flag of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py is accepted: it works as there, or
prints one line saying why it is not needed, and the run goes on."""

from __future__ import annotations

import argparse

import pytest
import torch

from sd3booth.cli import build_parser, main
from sd3booth.config import build_config, compat_notes
from sd3booth.data.dataset import write_demo_like_dataset

# parse_args() of train_dreambooth_lora_sd3.py, flag by flag, with a value a user would pass (None: a switch)
DIFFUSERS_FLAGS = {
    "--pretrained_model_name_or_path": "stabilityai/stable-diffusion-3-medium-diffusers",
    "--revision": "main", "--variant": "fp16", "--dataset_name": None, "--dataset_config_name": "default",
    "--instance_data_dir": "photos", "--cache_dir": "cache", "--image_column": "image", "--caption_column": "text",
    "--repeats": "2", "--class_data_dir": "class", "--instance_prompt": "a photo of sks dog",
    "--class_prompt": "a photo of a dog", "--max_sequence_length": "77", "--validation_prompt": "sks dog on a beach",
    "--num_validation_images": "4", "--validation_epochs": "50", "--rank": "16", "--lora_dropout": "0.1",
    "--with_prior_preservation": None, "--prior_loss_weight": "1.0", "--num_class_images": "100", "--output_dir": "out",
    "--seed": "0", "--resolution": "512", "--center_crop": None, "--random_flip": None, "--train_text_encoder": None,
    "--train_batch_size": "1", "--sample_batch_size": "4", "--num_train_epochs": "1", "--max_train_steps": "500",
    "--checkpointing_steps": "100", "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest",
    "--gradient_accumulation_steps": "4", "--gradient_checkpointing": None, "--learning_rate": "1e-4",
    "--text_encoder_lr": "5e-6", "--scale_lr": None, "--lr_scheduler": "constant", "--lr_warmup_steps": "0",
    "--lr_num_cycles": "1", "--lr_power": "1.0", "--dataloader_num_workers": "4", "--weighting_scheme": "logit_normal",
    "--logit_mean": "0.0", "--logit_std": "1.0", "--mode_scale": "1.29", "--precondition_outputs": "1",
    "--optimizer": "AdamW", "--use_8bit_adam": None, "--adam_beta1": "0.9", "--adam_beta2": "0.999",
    "--prodigy_beta3": "0.99", "--prodigy_decouple": "True", "--adam_weight_decay": "1e-4",
    "--adam_weight_decay_text_encoder": "1e-3", "--lora_layers": "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0",
    "--lora_blocks": "12,13", "--adam_epsilon": "1e-8", "--prodigy_use_bias_correction": "True",
    "--prodigy_safeguard_warmup": "True", "--max_grad_norm": "1.0", "--push_to_hub": None, "--hub_token": "hf_x",
    "--hub_model_id": "me/sks-dog", "--logging_dir": "logs", "--allow_tf32": None, "--cache_latents": None,
    "--report_to": "tensorboard", "--mixed_precision": "bf16", "--upcast_before_saving": None,
    "--prior_generation_precision": "fp16", "--local_rank": "0",
}  # fmt: skip


def _same(got, value):
    if isinstance(got, bool):
        return got is (value.lower() == "true")
    if isinstance(got, int | float):
        return got == type(got)(value)
    if isinstance(got, list):  # --validation_prompt is repeatable: one flag gives a list of one
        return got == [value]
    return str(got).lower() == value.lower()  # choices are case-insensitive, as AdamW/adamw


def _parse(argv):
    _root, subs = build_parser()
    ns, extra = subs["train"].parse_known_args(argv)
    assert not extra, extra
    return build_config({k: v for k, v in vars(ns).items() if v is not argparse.SUPPRESS})


@pytest.mark.parametrize("flag", sorted(DIFFUSERS_FLAGS))
def test_each_diffusers_flag_is_accepted(flag, tmp_path):
    value = DIFFUSERS_FLAGS[flag]
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]
    if flag in ("--instance_data_dir", "--pretrained_model_name_or_path"):
        argv = argv[2:] if flag == "--pretrained_model_name_or_path" else argv[:2]
    if flag == "--dataset_name":
        argv, value = argv[:2], "user/dogs"
    if flag in ("--class_data_dir", "--class_prompt", "--with_prior_preservation"):
        argv += ["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a dog"]
    argv += [flag] if value is None else [flag, value]
    cfg = _parse(argv)
    name = flag[2:]
    got = getattr(cfg, name)
    assert got is True if value is None else _same(got, value)
    noted = [n for n in compat_notes(cfg) if n.startswith(f"note: {flag} ")]
    assert len(noted) <= 1 and all("\n" not in n for n in noted)


def test_the_not_needed_ones_say_so_in_one_line():
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--cache_latents",
            "--dataloader_num_workers", "4", "--local_rank", "0", "--train_text_encoder", "--text_encoder_lr",
            "1e-5", "--adam_weight_decay_text_encoder", "0.01", "--prior_generation_precision", "bf16"]  # fmt: skip
    cfg = _parse(argv)
    flags = sorted(n.split()[1] for n in compat_notes(cfg))
    assert flags == ["--adam_weight_decay_text_encoder", "--cache_latents", "--dataloader_num_workers", "--local_rank",
                     "--prior_generation_precision"]  # fmt: skip
    alone = _parse(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--text_encoder_lr", "1e-5"])
    assert [n.split()[1] for n in compat_notes(alone)] == ["--text_encoder_lr"]
    assert compat_notes(_parse(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"])) == []


def test_diffusers_bool_spelling(tmp_path):
    """The script declares prodigy flags with type=bool, so users write '--prodigy_decouple False'."""
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]
    assert _parse([*base, "--prodigy_decouple", "False"]).prodigy_decouple is False
    assert _parse([*base, "--prodigy_decouple=true"]).prodigy_decouple is True
    assert _parse([*base, "--no-prodigy_decouple"]).prodigy_decouple is False
    assert _parse([*base, "--center_crop"]).center_crop is True


def test_a_pasted_diffusers_command_runs(tiny_model, tmp_path, capsys, monkeypatch):
    """The flags the issue names, as a user of the diffusers script passes them: the run finishes, notes one line
    per flag it does not need, saves fp32 for --upcast_before_saving and uploads with --push_to_hub (hub faked)."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp_path / "out"
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(out), "--instance_prompt", "a photo of sks toy", "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "1", "--center_crop", "--report_to", "none",
            "--dataloader_num_workers", "2", "--cache_latents", "--local_rank", "0", "--text_encoder_lr", "1e-5",
            "--prior_generation_precision", "fp16", "--upcast_before_saving", "--optimizer", "AdamW",
            "--push_to_hub", "--hub_model_id", "me/sks-toy", "--hub_token", "hf_secret"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 5 and all("continuing" in n for n in notes)
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(out / "pytorch_lora_weights.safetensors").values()} == {torch.float32}
    assert ("token", "hf_secret") in calls and ("create_repo", "me/sks-toy", True) in calls
    upload = next(c[1] for c in calls if c[0] == "upload_folder")
    assert upload["repo_id"] == "me/sks-toy" and upload["folder_path"] == out
    assert "checkpoints/**" in upload["ignore_patterns"] and "cache/**" in upload["ignore_patterns"]
    assert "hf_secret" not in (out / "settings.json").read_text()


def test_push_to_hub_offline_fails_before_training(tiny_model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--train_batch_size", "1", "--push_to_hub"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --push_to_hub needs the network") and "\n" not in err
    assert not (tmp_path / "out").exists()
