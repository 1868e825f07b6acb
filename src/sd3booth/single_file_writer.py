"""Single files in Stability's / ComfyUI's layout, written from a diffusers SD3 folder (tests, benchmarks, users
who want one file): the transformer under ``model.diffusion_model.``, the VAE in LDM names under
``first_stage_model.``, the encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``, or each encoder
in a file of its own as ComfyUI keeps them (``clip_l.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``).

The inverse of what diffusers' single-file loader reads; tests load these files back with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sd3booth.models.sai_keys import transformer_to_sai
from sd3booth.models.single_file import BUNDLED_ENCODERS, ENCODER_FOLDERS

_RESNET = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def vae_to_ldm(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the LDM names of Stability's files (1x1 convs for the mid attention)."""
    out = {}
    for key, v in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := _RESNET.fullmatch(k):
            i = int(m.group(3)) if m.group(2) == "down" else n_blocks - 1 - int(m.group(3))
            k = f"{m.group(1)}.{m.group(2)}.{i}.block.{m.group(4)}.{m.group(5)}"
        elif m := _SAMPLER.fullmatch(k):
            i = int(m.group(3)) if m.group(2) == "down" else n_blocks - 1 - int(m.group(3))
            k = f"{m.group(1)}.{m.group(2)}.{i}.{m.group(4)[:-2]}.conv.{m.group(5)}"
        elif m := _MID.fullmatch(k):
            if m.group(2) == "resnets":
                k = f"{m.group(1)}.mid.block_{int(m.group(3)) + 1}.{m.group(4)}"
            else:
                layer, _, kind = m.group(4).rpartition(".")
                k = f"{m.group(1)}.mid.attn_1.{_ATTN[layer]}.{kind}"
                if kind == "weight" and v.ndim == 2:
                    v = v[:, :, None, None]
        out[k] = v
    return out


def encoder_state(model_dir: Path, which: str) -> dict[str, torch.Tensor]:
    """An encoder's tensors as Stability and ComfyUI store them (T5's tied embedding once, as ``shared``)."""
    state = _folder_state(Path(model_dir) / ENCODER_FOLDERS[which])
    state.pop("encoder.embed_tokens.weight", None)
    state.pop("text_model.embeddings.position_ids", None)
    return state


def write_single_file(
    model_dir: str | Path, out: str | Path, encoders: tuple[str, ...] = ("clip_l", "clip_g", "t5xxl")
) -> Path:
    """One SD3 checkpoint file from a diffusers folder, with the named encoders bundled."""
    import json

    model_dir, out = Path(model_dir), Path(out)
    n_blocks = len(json.loads((model_dir / "vae" / "config.json").read_text())["block_out_channels"])
    transformer = transformer_to_sai(_folder_state(model_dir / "transformer"))
    state = {f"model.diffusion_model.{k}": v for k, v in transformer.items()}
    vae = vae_to_ldm(_folder_state(model_dir / "vae"), n_blocks)
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    for which in encoders:
        state.update({BUNDLED_ENCODERS[which] + k: v for k, v in encoder_state(model_dir, which).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out, metadata={"format": "pt"})
    return out


def write_encoder_file(
    model_dir: str | Path, which: str, out: str | Path, fp8: bool = False, scaled: bool = False
) -> Path:
    """One encoder in a file of its own; ``fp8`` stores its matrices as float8 e4m3 (``t5xxl_fp8_e4m3fn``), and
    ``scaled`` as ComfyUI's scaled variant (fp8 weight times a per-tensor ``scale_weight``)."""
    state = encoder_state(Path(model_dir), which)
    if fp8:
        for k in [k for k, v in state.items() if v.ndim == 2]:
            w = state[k].float()
            if scaled:
                scale = w.abs().max().clamp(min=1e-12) / 448.0  # e4m3's largest finite value
                state[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
                w = w / scale
            state[k] = w.to(torch.float8_e4m3fn)
        if scaled:
            state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out, metadata={"format": "pt"})
    return out
