"""Names of the SD3 transformer in Stability's own layout (single files, ComfyUI, kohya) and in diffusers'.

Stability's MMDiT (``joint_blocks.{i}.x_block…``) fuses q, k and v into one ``attn.qkv`` Linear, and its
pre-only AdaLN layers (the last block's ``context_block.adaLN_modulation.1`` and
``final_layer.adaLN_modulation.1``) emit (shift, scale) where diffusers' emit (scale, shift). These facts
come from diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, ComfyUI's ``mmdit_to_diffusers``
and kohya's ``library/sd3_models.py``; the table is ours because the LoRA formats need it in both directions
(diffusers only converts whole checkpoints, one way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# diffusers module inside transformer_blocks.{i} -> (Stability module inside joint_blocks.{i}, row third or None)
BLOCK_LINEARS: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# Linear layers outside the blocks
GLOBAL_LINEARS: dict[str, str] = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# parameters that are not Linear layers (a whole single file needs them too)
BLOCK_NORMS: dict[str, str] = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
GLOBAL_OTHER: dict[str, str] = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj"}

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_JOINT = re.compile(r"joint_blocks\.(\d+)\.(.+)")
_SAI_BLOCK = {sai: [d for d, (s, _p) in BLOCK_LINEARS.items() if s == sai] for sai, _ in BLOCK_LINEARS.values()}
_SAI_GLOBAL = {sai: d for d, sai in GLOBAL_LINEARS.items()}


@dataclass(frozen=True)
class SaiName:
    """Where a diffusers Linear lives in Stability's layout: the module, and which third of its rows (q/k/v)."""

    module: str
    part: int | None = None


def to_sai(module: str) -> SaiName | None:
    """diffusers transformer module (``transformer_blocks.3.attn.to_k``) -> Stability name; None if not a Linear
    that Stability's layout has."""
    m = _BLOCK.fullmatch(module)
    if m:
        hit = BLOCK_LINEARS.get(m.group(2))
        return SaiName(f"joint_blocks.{m.group(1)}.{hit[0]}", hit[1]) if hit else None
    return SaiName(GLOBAL_LINEARS[module]) if module in GLOBAL_LINEARS else None


def from_sai(module: str) -> list[str]:
    """Stability module -> the diffusers module(s) it holds, in row order (three for a fused qkv)."""
    m = _JOINT.fullmatch(module)
    if m:
        return [f"transformer_blocks.{m.group(1)}.{d}" for d in _SAI_BLOCK.get(m.group(2), [])]
    return [_SAI_GLOBAL[module]] if module in _SAI_GLOBAL else []


def is_swapped(sai_module: str, out_features: int, in_features: int) -> bool:
    """Whether the rows of this Stability AdaLN Linear are (shift, scale) where diffusers has (scale, shift):
    the final layer always; a block's context modulation only when it is pre-only (the last block), which is
    the one that emits 2 x hidden values instead of 6."""
    if sai_module == "final_layer.adaLN_modulation.1":
        return True
    return sai_module.endswith("context_block.adaLN_modulation.1") and out_features == 2 * in_features


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along the rows: the same permutation maps either layout to the other."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_sai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in Stability's layout (what a single file stores after
    ``model.diffusion_model.``): q/k/v fused, pre-only AdaLN rows swapped, 1x1 names renamed."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if module in GLOBAL_OTHER or key in GLOBAL_OTHER:
            out[GLOBAL_OTHER[key] if key in GLOBAL_OTHER else f"{GLOBAL_OTHER[module]}.{kind}"] = value
            continue
        m = _BLOCK.fullmatch(module)
        if m and m.group(2) in BLOCK_NORMS:
            out[f"joint_blocks.{m.group(1)}.{BLOCK_NORMS[m.group(2)]}.{kind}"] = value
            continue
        name = to_sai(module)
        if name is None:
            raise KeyError(f"no Stability name for {key}")
        if name.part is not None:
            fused.setdefault(f"{name.module}.{kind}", [None, None, None])[name.part] = value
            continue
        swap = is_swapped(name.module, value.shape[0], state[f"{module}.weight"].shape[1])
        out[f"{name.module}.{kind}"] = swap_halves(value) if swap else value
    for key, parts in fused.items():
        out[key] = torch.cat([p for p in parts if p is not None], dim=0)
    return out
