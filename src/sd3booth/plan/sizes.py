"""What a checkpoint holds, read from its safetensors headers (no weights are loaded)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

# ---- what the checkpoint holds (headers only) ----------------------------------------------------------


def _tensor_numels(folder: Path, variant: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    files = sorted(folder.glob("*.safetensors"))
    if variant:
        files = [f for f in files if f".{variant}." in f.name] or files
    else:
        plain = [f for f in files if f.name.count(".") == 1 or "-of-" in f.name]
        files = plain or files
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                numel = 1
                for d in meta["shape"]:
                    numel *= d
                out[name] = numel
    return out


_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")


def _file_bytes(folder: Path, variant: str | None) -> int:
    files = [f for f in folder.glob("*.safetensors") if not variant or f".{variant}." in f.name] or list(
        folder.glob("*.safetensors")
    )
    return sum(f.stat().st_size for f in files)


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts and shapes that the cost model needs, read from a diffusers SD3 folder."""

    n_blocks: int
    block_params: int  # largest block
    other_params: int  # transformer outside the joint blocks
    hidden: int
    clip_l_params: int
    clip_g_params: int
    t5_params: int
    t5_layer_params: int
    vae_params: int
    t5_wo_params: int = 0  # T5's FFN output projections (kept fp32 when T5 runs in fp16)
    # the weight files of each component, bytes in all: the bitsandbytes (int8/NF4) loading paths map them into
    # host memory (measured: every shard of a component at once, 2026-11-25); models.reader does not
    file_bytes: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def transformer_params(self) -> int:
        return self.block_params * self.n_blocks + self.other_params


def read_sizes(root: Path, variant: str | None = None) -> ModelSizes:
    cfg = json.loads((root / "transformer" / "config.json").read_text(encoding="utf-8"))
    tr = _tensor_numels(root / "transformer", variant)
    blocks: dict[int, int] = {}
    other = 0
    for name, n in tr.items():
        if name.startswith("transformer_blocks."):
            i = int(name.split(".")[1])
            blocks[i] = blocks.get(i, 0) + n
        else:
            other += n
    t5 = _tensor_numels(root / "text_encoder_3", variant) if (root / "text_encoder_3").is_dir() else {}
    layer: dict[str, int] = {}
    for name, n in t5.items():
        if ".block." in name:
            key = name.split(".block.")[1].split(".")[0]
            layer[key] = layer.get(key, 0) + n

    def total(sub: str) -> int:
        return sum(_tensor_numels(root / sub, variant).values()) if (root / sub).is_dir() else 0

    return ModelSizes(
        n_blocks=cfg["num_layers"], block_params=max(blocks.values()), other_params=other,
        hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"], clip_l_params=total("text_encoder"),
        clip_g_params=total("text_encoder_2"), t5_params=sum(t5.values()),
        t5_layer_params=max(layer.values()) if layer else 0, vae_params=total("vae"),
        t5_wo_params=sum(n for name, n in t5.items() if ".DenseReluDense.wo." in name),
        file_bytes={sub: _file_bytes(root / sub, variant) for sub in _COMPONENTS if (root / sub).is_dir()},
    )  # fmt: skip
