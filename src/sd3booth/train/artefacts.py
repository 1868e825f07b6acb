"""What a run writes and restores of its adapters: the raw state of checkpoints, and the exported files.

The exported files (and validation) use the run's export view (``ema.export_view``): the EMA weights when
``--use_ema`` (the raw ones then go beside, ``…_raw.safetensors``), a schedule-free optimizer's eval-mode
average. Checkpoints keep the raw training weights, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd3booth.adapters import formats, lora
from sd3booth.train.ema import export_view

TEXT_PREFIXES = tuple(f"{name}." for name in ("text_encoder", "text_encoder_2"))


@dataclass
class RunResult:
    """What ``sd3booth train`` produced."""

    output_dir: Path
    lora_path: Path | None
    steps: int
    final_loss: float | None
    seconds_per_step: float | None
    stages: list[dict[str, Any]] = field(default_factory=list)
    validation_dirs: list[Path] = field(default_factory=list)


def raw_state(run: Any) -> dict[str, torch.Tensor]:
    """Raw adapter weights (transformer keys unprefixed, text-encoder keys under their prefixes)."""
    state = lora.lora_state(run.accelerator.unwrap_model(run.transformer))
    if run.text is not None:
        state.update(run.text.state())
    return state


def restore(run: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """Puts a checkpoint's raw weights back (any missing or unexpected key is a one-line error)."""
    transformer = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIXES)}
    lora.load_lora_state(run.accelerator.unwrap_model(run.transformer), transformer, source)
    if run.text is not None:
        run.text.load_state({k: v for k, v in state.items() if k.startswith(TEXT_PREFIXES)}, source)
    for p in run.params:
        p.data = p.data.float()


def export(run: Any, folder: Path) -> list[Path]:
    """Writes the adapter file(s) into folder, main file first; the raw weights beside when there is an EMA."""
    net = run.accelerator.unwrap_model(run.transformer)
    encoders = {k: run.accelerator.unwrap_model(e) for k, e in run.text.named.items()} if run.text else None
    base = run.prep.src.root / "transformer"
    optimizer = run.optimizer.optimizer
    with export_view(optimizer, run.ema, run.params):
        paths = formats.save_adapter(folder, net, run.spec, encoders, base)
    if run.ema is not None:
        paths += formats.save_adapter(folder, net, run.spec, encoders, base, suffix=formats.RAW_SUFFIX)
    return paths
