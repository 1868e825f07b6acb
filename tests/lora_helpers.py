"""Shared by the LoRA format and tool tests: a trained-looking LoRA on the tiny model."""

import os
import tempfile
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from sd3booth.adapters import lora

# every Linear kind of an SD3 block and outside the blocks: the widest target set a LoRA can have
ALL_LINEAR = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
]  # fmt: skip


def base_transformer(tiny_model):
    return SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")


def write_trained_lora(tiny_model, path, layers=ALL_LINEAR, rank=4, alpha=8, seed=0):
    """A LoRA with random A and B on ``layers`` (alpha != rank, so the folding is exercised)."""
    net = base_transformer(tiny_model)
    lora.add_lora(net, rank, alpha, 0.0, lora.resolve_targets(net, list(layers), None))
    g = torch.Generator().manual_seed(seed)
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        written = lora.save_lora(net, Path(tmp), rank, alpha)
        os.replace(written, path)
    return path
