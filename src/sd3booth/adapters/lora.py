"""LoRA adapters on the SD3 transformer: targeting, state-dict I/O, and the exported file format.

peft does the adapters; diffusers writes the file. What is ours: checking that every requested target
exists (peft silently ignores targets that match nothing as long as one matches), and making the saved
file mean what it says when alpha != rank (loaders assume alpha = rank, sd3-facts §3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sd3booth.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


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
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights and optimizer state in fp32, whatever the base precision
    return params


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
            "resume with the same --rank, --lora_layers and --lora_blocks"
        )


def export_state_dict(transformer: torch.nn.Module, rank: int, alpha: int) -> dict[str, torch.Tensor]:
    """Weights for the diffusers file: alpha/rank folded into lora_B so loaders assuming alpha = rank agree."""
    scale = alpha / rank
    out = {}
    for k, v in get_peft_model_state_dict(transformer).items():
        v = v.detach().float().cpu()
        out[k] = v * scale if scale != 1.0 and ".lora_B." in k else v.clone()
    return out


def save_lora(
    transformer: torch.nn.Module,
    out_dir: Path,
    rank: int,
    alpha: int,
    fmt: str = "diffusers",
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    name: str = LORA_FILE,
) -> Path:
    """Writes the adapter as ``out_dir/name`` in ``fmt`` (adapters.formats; diffusers: keys
    ``transformer.…lora_A/B.weight``, written by diffusers), alpha folded in, in ``dtype``."""
    from sd3booth.adapters.formats import write_lora

    modules = {}
    state = export_state_dict(transformer, rank, alpha)
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            modules[f"transformer.{module}"] = (a, state[key.replace(".lora_A.", ".lora_B.")])
    return write_lora(modules, Path(out_dir) / name, fmt, dtype, metadata)
