"""random-model: tiny loads through the real loader; true-size archs have the published parameter counts."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd3booth.cli import main
from sd3booth.models.source import resolve_model
from sd3booth.random_model import get_arch


def _count(make) -> float:
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters()) / 1e9


@pytest.mark.parametrize(("arch", "billions"), [("sd3-medium", 2.03), ("sd3.5-medium", 2.24), ("sd3.5-large", 8.06)])
def test_true_size_transformers(arch, billions):
    assert _count(lambda: SD3Transformer2DModel(**get_arch(arch).transformer)) == pytest.approx(billions, abs=0.01)


def test_true_size_text_encoders():
    a = get_arch("sd3-medium")
    special = dict(max_position_embeddings=77)
    assert _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**a.clip_l, **special))) == pytest.approx(
        0.124, abs=0.002
    )
    assert _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**a.clip_g, **special))) == pytest.approx(
        0.695, abs=0.002
    )
    assert _count(lambda: T5EncoderModel(T5Config(**a.t5))) == pytest.approx(4.76, abs=0.01)


def test_cli_random_model_is_a_loadable_sd3_pipeline(tmp_path, capsys):
    assert main(["random-model", str(tmp_path / "m")]) == 0
    src = resolve_model(str(tmp_path / "m"))
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(src.root)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    img = pipe("a toy", num_inference_steps=1, height=64, width=64, output_type="pt").images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_tiny_has_comfyui_shapes_and_a_quiet_vae_posterior(tiny_model):
    """ComfyUI reads an MMDiT's size from tensor shapes alone: depth = x_embedder width / 64, heads = blocks = depth
    (head dim 64). The VAE's posterior noise must be small next to the latent signal, or training sees noise."""
    import json

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    tr = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    cfg = {
        sub: json.loads((tiny_model / sub / "config.json").read_text())
        for sub in ("text_encoder", "text_encoder_2", "text_encoder_3")
    }
    width = tr.pos_embed.proj.weight.shape[0]  # ComfyUI's x_embedder.proj.weight
    depth = width // 64
    assert width == 64 * depth >= 2 * 2 * 16  # at least one latent patch wide
    assert depth == tr.config.num_attention_heads == len(tr.transformer_blocks)
    assert tr.context_embedder.weight.shape == (width, cfg["text_encoder_3"]["d_model"])
    pooled = cfg["text_encoder"]["projection_dim"] + cfg["text_encoder_2"]["projection_dim"]
    assert tr.time_text_embed.text_embedder.linear_1.weight.shape == (width, pooled)

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    x = torch.linspace(-1, 1, 64).expand(1, 3, 64, 64).clone()
    x[:, 0, 16:48, 16:48] = 1.0  # a gradient with a square on it
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    signal = (posterior.mean * vae.config.scaling_factor).std()
    noise = posterior.std.max() * vae.config.scaling_factor
    assert signal > 0.1 and noise < 0.05 * signal, (signal, noise)
