"""LoRA formats: diffusers <-> kohya <-> ComfyUI round trips give the same merged weights, merged the way each
tool merges (diffusers' own loader; kohya's and ComfyUI's key rules on Stability's names, converted back with
diffusers' own checkpoint converter); detection; one-line errors for unknown layouts and foreign LoRAs."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from lora_helpers import base_transformer as _base
from lora_helpers import write_trained_lora  # noqa: E402, I001
from safetensors.torch import load_file, save_file

from sd3booth.adapters import layouts
from sd3booth.cli import main
from sd3booth.models.sai_keys import transformer_to_sai


def merged_by_diffusers(tiny_model, path):
    """What diffusers' own loader makes of a diffusers file: the fused transformer weights."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def merged_by_stability_rules(tiny_model, path, kohya):
    """kohya / ComfyUI: each LoRA key names a Stability weight (kohya: 'lora_unet_' + name with '.' -> '_';
    ComfyUI: 'diffusion_model.' + name); W += alpha / rank * up @ down. Back to diffusers names with diffusers'
    own single-file converter, which is independent of ours."""
    base = _base(tiny_model).state_dict()
    sai = {k: v.clone() for k, v in transformer_to_sai(base).items()}
    names = {("lora_unet_" + k[:-7].replace(".", "_")) if kohya else ("diffusion_model." + k[:-7]): k
             for k in sai if k.endswith(".weight")}  # fmt: skip
    state = load_file(path)
    consumed = set()
    for key in state:
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            down, up = state[key].float(), state[f"{module}.lora_up.weight"].float()
            scale = float(state[f"{module}.alpha"]) / down.shape[0]
            sai[names[module]] += scale * up @ down
            consumed |= {key, f"{module}.lora_up.weight", f"{module}.alpha"}
    assert consumed == set(state), f"keys no rule consumed: {sorted(set(state) - consumed)[:3]}"
    return convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in sai.items()})


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-5, msg=k)


def test_every_export_merges_to_the_diffusers_weights(tiny_model, tmp_path):
    src = write_trained_lora(tiny_model, tmp_path / "d.safetensors")
    reference = merged_by_diffusers(tiny_model, src)
    assert not torch.equal(reference["proj_out.weight"], _base(tiny_model).state_dict()["proj_out.weight"])
    for fmt in ("kohya", "comfyui"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["lora", "convert", str(src), str(out), "--to", fmt, "--save_precision", "fp32"]) == 0
        _assert_same(merged_by_stability_rules(tiny_model, out, kohya=fmt == "kohya"), reference)


def test_round_trips_keep_the_factors(tiny_model, tmp_path):
    """diffusers -> kohya -> comfyui -> diffusers: the same layers, the same up @ down, and fused q/k/v split back
    into the original ranks (the block-diagonal columns are recognised)."""
    src = write_trained_lora(tiny_model, tmp_path / "d.safetensors")
    chain = [("kohya", "k"), ("comfyui", "c"), ("diffusers", "d2"), ("comfyui", "c2"), ("diffusers", "d3")]
    prev = src
    for fmt, name in chain:
        out = tmp_path / f"{name}.safetensors"
        assert main(["lora", "convert", str(prev), str(out), "--to", fmt, "--save_precision", "fp32"]) == 0
        assert layouts.read_lora(out).format == fmt
        prev = out
    first, last = layouts.read_lora(src).modules, layouts.read_lora(prev).modules
    assert set(first) == set(last)
    for name, (d, u) in first.items():
        assert last[name][0].shape == d.shape  # rank 4 again, not the fused 12
        torch.testing.assert_close(layouts.delta(*last[name]), layouts.delta(d, u), rtol=1e-5, atol=1e-6)
    _assert_same(merged_by_diffusers(tiny_model, prev), merged_by_diffusers(tiny_model, src))


def test_kohya_export_follows_kohyas_module_naming(tiny_model, tmp_path):
    """kohya's rules (networks/lora_sd3.py), transcribed as data: LoRA modules are the Linear children of every
    SingleDiTBlock (joint_blocks.{i}.x_block / .context_block) plus the emb_dims filters (context_embedder,
    t_embedder, y_embedder, final_layer_adaLN_modulation, final_layer_linear), each named
    'lora_unet_' + '<block>.<child>' with '.' -> '_'; text encoders 'lora_te1_' (CLIP-L) / 'lora_te2_' (CLIP-G)
    on CLIPAttention / CLIPMLP children. Every module we export must be one kohya creates, with lora_down
    (rank, in), lora_up (out, rank) and alpha, as create_network_from_weights reads them."""
    src = write_trained_lora(tiny_model, tmp_path / "d.safetensors")
    out = tmp_path / "k.safetensors"
    assert main(["lora", "convert", str(src), str(out), "--to", "kohya"]) == 0
    sai = transformer_to_sai(_base(tiny_model).state_dict())
    kohya_modules = {}
    for key, w in sai.items():
        module = key[: -len(".weight")]
        in_block = re.fullmatch(r"joint_blocks\.\d+\.(x_block|context_block)\..+", module)
        emb = re.fullmatch(
            r"(context_embedder|[ty]_embedder\.mlp\.\d|final_layer\.(adaLN_modulation\.1|linear))", module
        )
        if key.endswith(".weight") and w.ndim == 2 and (in_block or emb):
            kohya_modules["lora_unet_" + module.replace(".", "_")] = tuple(w.shape)
    state = load_file(out)
    names = {k.split(".")[0] for k in state}
    assert names and names <= set(kohya_modules), sorted(names - set(kohya_modules))[:3]
    for name in names:
        out_f, in_f = kohya_modules[name]
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        assert down.shape == (down.shape[0], in_f) and up.shape == (out_f, down.shape[0])
        assert state[f"{name}.alpha"].numel() == 1
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in names  # fused q/k/v, as kohya trains them
    assert "lora_unet_final_layer_adaLN_modulation_1" in names


def test_text_encoder_layers_keep_each_tools_names(tmp_path):
    """CLIP layers: diffusers 'text_encoder(_2).text_model…', kohya 'lora_te1_/lora_te2_…' (ComfyUI's
    LORA_CLIP_MAP: self_attn_q_proj, mlp_fc1), ComfyUI 'text_encoders.clip_l/clip_g.transformer.…'."""
    g = torch.Generator().manual_seed(0)

    def pair(out, r=2, inp=8):
        return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)

    modules = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": pair(8),
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": pair(16),
        "transformer.transformer_blocks.0.attn.to_q": pair(8),
    }
    keys = {fmt: set(layouts.to_state_dict(modules, fmt)) for fmt in layouts.FORMATS}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys["diffusers"]
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys["kohya"]
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in keys["kohya"]
    assert (
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight"
        in keys["comfyui"]
    )
    for fmt in layouts.FORMATS:
        path = tmp_path / f"{fmt}.safetensors"
        layouts.write_lora(modules, path, fmt, torch.float32)
        back = layouts.read_lora(path)
        assert back.format == fmt and set(back.modules) == set(modules)
        for name, (d, u) in modules.items():
            torch.testing.assert_close(layouts.delta(*back.modules[name]), layouts.delta(d, u))


@pytest.mark.parametrize(
    ("keys", "fmt"),
    [
        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers"),
        (["transformer_blocks.0.attn.to_q.lora_B.weight"], "diffusers"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "lora_te1_x.alpha"], "kohya"),
        (["diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight"], "comfyui"),
        (["lora_unet_down_blocks_0.lora_down.weight", "diffusion_model.x.lora_up.weight"], None),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], None),
    ],
)
def test_detection(keys, fmt):
    assert layouts.detect_format(keys) == fmt


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_and_foreign_files_are_one_line_errors(tmp_path, capsys):
    t = torch.zeros(2, 4)
    save_file({"some.weight": t}, tmp_path / "model.safetensors")
    sdxl = "lora_unet_input_blocks_1_1_proj_in"
    save_file(
        {f"{sdxl}.lora_down.weight": t, f"{sdxl}.lora_up.weight": t.T.contiguous()}, tmp_path / "sdxl.safetensors"
    )
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    assert "not a LoRA layout" in _one_line_error(capsys, ["lora", "info", str(tmp_path / "model.safetensors")])
    assert "for another model" in _one_line_error(capsys, ["lora", "info", str(tmp_path / "sdxl.safetensors")])
    assert "damaged" in _one_line_error(capsys, ["lora", "info", str(tmp_path / "notes.safetensors")])
    assert "is a folder" in _one_line_error(capsys, ["lora", "info", str(tmp_path)])
    assert "does not exist" in _one_line_error(capsys, ["lora", "info", str(tmp_path / "nope.safetensors")])


def test_peft_metadata_alpha_is_honoured(tmp_path):
    """A diffusers file whose lora_adapter_metadata says lora_alpha != r (peft-style, unfolded B) means
    alpha / r * B @ A, as diffusers loads it."""
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    meta = {"format": "pt", "lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 2}'}
    q = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b}, tmp_path / "p.safetensors", metadata=meta)
    d, u = layouts.read_lora(tmp_path / "p.safetensors").modules["transformer.transformer_blocks.0.attn.to_q"]
    torch.testing.assert_close(u @ d, 4.0 * b @ a)


def test_sd35_medium_layers_dual_attention_and_qk_norm(tmp_path):
    """SD3.5 Medium's extra layers (attn2 in the first blocks, RMS q/k norms): our Stability names invert diffusers'
    own converter, and an attn2 LoRA survives kohya and ComfyUI round trips."""
    cfg = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
               pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")  # fmt: skip
    torch.manual_seed(0)
    net = SD3Transformer2DModel(**cfg)
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    sai = transformer_to_sai(state)
    assert "joint_blocks.1.x_block.attn2.qkv.weight" in sai and "joint_blocks.2.context_block.attn.ln_q.weight" in sai
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    _assert_same(back, state)
    g = torch.Generator().manual_seed(1)
    block = "transformer.transformer_blocks.1.attn2"
    modules = {f"{block}.{m}": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))
               for m in ("to_q", "to_k", "to_v", "to_out.0")}  # fmt: skip
    for fmt in ("kohya", "comfyui"):
        path = layouts.write_lora(modules, tmp_path / f"{fmt}.safetensors", fmt, torch.float32)
        assert any("attn2" in k and "qkv" in k for k in load_file(path))
        back_modules = layouts.read_lora(path).modules
        assert set(back_modules) == set(modules)
        for name, (d, u) in modules.items():
            torch.testing.assert_close(layouts.delta(*back_modules[name]), layouts.delta(d, u))
