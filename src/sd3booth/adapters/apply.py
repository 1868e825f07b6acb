"""Applying a saved adapter file to a pipeline for ``sd3booth generate``, each format by the library that defines it:
diffusers for LoRA/DoRA files, lycoris-lora for LoHa/LoKr files (LyCORIS' own reader of its ``lycoris_`` layout).
The text-encoder part (``text_encoder.``/``text_encoder_2.`` keys) is returned for the caller, which encodes
prompts with it (generate's pipeline has no text encoders: embeddings come from the cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sd3booth.adapters.formats import LYCORIS_PREFIX
from sd3booth.adapters.text_encoder import NAMES
from sd3booth.errors import UserError


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(transformer part, {text_encoder name: its part without the prefix})."""
    text = {n: {k[len(n) + 1 :]: v for k, v in state.items() if k.startswith(n + ".")} for n in NAMES}
    rest = {k: v for k, v in state.items() if not k.startswith(tuple(f"{n}." for n in NAMES))}
    return rest, {n: part for n, part in text.items() if part}


def apply_lycoris(
    transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str, multiplier: float = 1.0
) -> int:
    """Hooks a LoHa/LoKr state (LyCORIS layout) into the transformer's Linear layers; returns the modules hooked.

    LyCORIS' forward path, not its ``merge_to``: in lycoris-lora 4.1.3 merging a LoHa applies alpha/rank twice
    (measured: a file with alpha = 2 rank merged at 4x its delta), while its forward applies it once."""
    from lycoris import create_lycoris_from_weights

    wanted = {k.split(".")[0] for k in state}
    if any(not isinstance(m.weight, torch.nn.Parameter) or m.weight.dtype == torch.uint8
           for m in transformer.modules() if isinstance(m, torch.nn.Linear)):  # fmt: skip
        raise UserError(f"{source}: LoHa/LoKr files apply to bf16/fp32 weights, not quantised ones; raise --max_vram")
    network, _ = create_lycoris_from_weights(multiplier, "", transformer, weights_sd=state)
    if len(network.loras) != len(wanted):
        raise UserError(f"{source}: {len(wanted) - len(network.loras)} adapted module(s) are not in this model")
    param = next(transformer.parameters())
    network.to(param.device, param.dtype)
    network.apply_to()
    transformer._sd3booth_lycoris = network  # keeps the network with the model it hooks
    return len(network.loras)


def apply_file(pipe: Any, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Applies the transformer part of an adapter file to ``pipe``; returns its text-encoder parts."""
    state = load_file(path)
    transformer, text = split_state(state)
    if any(k.startswith(LYCORIS_PREFIX) for k in transformer):
        apply_lycoris(pipe.transformer, transformer, str(path))
    elif transformer:
        pipe.load_lora_weights(transformer)
    return text
