"""LoRA adapters on the SD3 transformer: targeting, state-dict I/O, and the exported file format.

peft does the adapters; diffusers writes the file. What is ours: checking that every requested target
exists (peft silently ignores targets that match nothing as long as one matches), and making the saved
file mean what it says when alpha != rank (loaders assume alpha = rank, sd3-facts §3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sd3booth.adapters import formats
from sd3booth.adapters.build import AdapterSpec, add_adapter
from sd3booth.errors import UserError

LORA_FILE = formats.LORA_FILE


def resolve_targets(transformer: torch.nn.Module, layers: list[str], blocks: list[int] | None) -> list[str]:
    """Module-name suffixes for peft; each must match at least one Linear of the transformer."""
    n_blocks = len(transformer.transformer_blocks)
    if blocks is not None:
        bad = [b for b in blocks if b >= n_blocks]
        if bad:
            raise UserError(f"--lora_blocks {bad} out of range: this transformer has blocks 0..{n_blocks - 1}")
        targets = [f"transformer_blocks.{b}.{layer}" for b in blocks for layer in layers]
    else:
        targets = list(layers)
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    unknown = sorted(
        {
            t.split(".", 2)[-1] if blocks is not None else t
            for t in targets
            if not any(n == t or n.endswith("." + t) for n in names)
        }
    )
    if unknown:
        raise UserError(
            f"--lora_layers {','.join(unknown)} match no Linear layer of the transformer; "
            "use names like attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,ff.net.2"
        )
    return targets


def add_lora(
    transformer: torch.nn.Module, rank: int, alpha: int, dropout: float, targets: list[str]
) -> list[torch.nn.Parameter]:
    """Adds a trainable LoRA (Gaussian A, zero B, as the reference); returns its parameters, cast to fp32."""
    return add_adapter(transformer, AdapterSpec("lora", rank, alpha, dropout), targets)


def lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's raw weights (peft names, no scale baked in): what checkpoints store."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Restores raw adapter weights; any missing or unexpected key is an error (checkpoint of another setup)."""
    result = set_peft_model_state_dict(transformer, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = set(get_peft_model_state_dict(transformer))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise UserError(
            f"{source} does not fit this LoRA setup ({len(missing)} missing, {len(unexpected)} unexpected keys); "
            "resume with the same --lora_type, --rank, --lora_layers and --lora_blocks"
        )


def export_state_dict(transformer: torch.nn.Module, rank: int, alpha: int) -> dict[str, torch.Tensor]:
    """Weights for the diffusers file: alpha/rank folded into lora_B so loaders assuming alpha = rank agree."""
    return formats.lora_layers(transformer, AdapterSpec("lora", rank, alpha))


def save_lora(transformer: torch.nn.Module, out_dir: Path, rank: int, alpha: int) -> Path:
    """Writes ``pytorch_lora_weights.safetensors`` (keys ``transformer.…lora_A/B.weight``) via diffusers."""
    return formats.save_adapter(out_dir, transformer, AdapterSpec("lora", rank, alpha))[0]
