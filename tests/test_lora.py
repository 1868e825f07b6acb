"""LoRA targeting, the exported file's key names, alpha handling, and loading in diffusers."""

import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from sd3booth.adapters import lora
from sd3booth.config import DEFAULT_LORA_LAYERS
from sd3booth.errors import UserError

PROJ = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _transformer(tiny_model):
    return SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")


def _randomise_b(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_default_targets_give_the_reference_key_names(tiny_model, tmp_path):
    net = _transformer(tiny_model)
    params = lora.add_lora(net, 4, 4, 0.0, lora.resolve_targets(net, list(DEFAULT_LORA_LAYERS), None))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    path = lora.save_lora(net, tmp_path, 4, 4)
    keys = set(load_file(path))
    n_blocks = len(net.transformer_blocks)
    expected = set()
    for i in range(n_blocks):
        for proj in PROJ:
            if proj == "to_add_out" and i == n_blocks - 1:
                continue  # the last block is context_pre_only: no to_add_out
            for ab in ("lora_A", "lora_B"):
                expected.add(f"transformer.transformer_blocks.{i}.attn.{proj}.{ab}.weight")
    assert keys == expected


def test_blocks_and_layers_restrict_targets(tiny_model):
    net = _transformer(tiny_model)
    targets = lora.resolve_targets(net, ["attn.to_q", "attn.to_v"], [1])
    lora.add_lora(net, 2, 2, 0.0, targets)
    names = set(get_peft_model_state_dict(net))
    assert names == {f"transformer_blocks.1.attn.{p}.lora_{ab}.weight" for p in ("to_q", "to_v") for ab in ("A", "B")}


@pytest.mark.parametrize(("layers", "blocks"), [(["attn.to_qq"], None), (["attn.to_q"], [7])])
def test_targets_that_match_nothing_are_errors(tiny_model, layers, blocks):
    with pytest.raises(UserError):
        lora.resolve_targets(_transformer(tiny_model), layers, blocks)


def _pipe_output(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images


@pytest.mark.parametrize("alpha", [4, 8])
def test_file_loads_in_diffusers_and_means_what_the_trained_adapter_did(tiny_model, tmp_path, alpha):
    """alpha != rank is folded into B: diffusers (which assumes alpha = rank) reproduces the trained model."""
    net = _transformer(tiny_model)
    lora.add_lora(net, 4, alpha, 0.0, lora.resolve_targets(net, list(DEFAULT_LORA_LAYERS), None))
    _randomise_b(net)
    path = lora.save_lora(net, tmp_path, 4, alpha)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = _pipe_output(pipe)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    # diffusers notes that the file has no text-encoder LoRA (it says so for the reference's files too);
    # any other warning (missing or unexpected keys, incompatible shapes) fails the test.
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert [m for m in warned if not m.startswith("No LoRA keys associated to CLIPTextModel")] == []
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    saved = load_file(path)
    assert {f"transformer.{k}" for k in loaded} == set(saved)  # nothing missing, nothing unexpected
    with_lora = _pipe_output(pipe)
    assert not torch.allclose(base, with_lora, atol=1e-4)

    trained = StableDiffusion3Pipeline.from_pretrained(tiny_model, transformer=net)
    trained.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_pipe_output(trained), with_lora, rtol=1e-4, atol=1e-4)


def test_resume_state_roundtrip_and_mismatch(tiny_model):
    net = _transformer(tiny_model)
    targets = lora.resolve_targets(net, list(DEFAULT_LORA_LAYERS), None)
    lora.add_lora(net, 4, 4, 0.0, targets)
    _randomise_b(net, 3)
    state = lora.lora_state(net)
    other = _transformer(tiny_model)
    lora.add_lora(other, 4, 4, 0.0, targets)
    lora.load_lora_state(other, state, "ckpt")
    for k, v in lora.lora_state(other).items():
        assert torch.equal(v, state[k])
    smaller = _transformer(tiny_model)
    lora.add_lora(smaller, 4, 4, 0.0, lora.resolve_targets(smaller, ["attn.to_q"], None))
    with pytest.raises(UserError, match="does not fit"):
        lora.load_lora_state(smaller, state, "ckpt")
