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
