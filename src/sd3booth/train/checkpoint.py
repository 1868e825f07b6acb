"""Resumable training state: written whole into a temporary folder, then renamed into place.

A checkpoint holds everything the loop needs to continue bit-exactly: the raw LoRA weights, the
optimizer, LR-scheduler and grad-scaler states and the step. Data order and per-step randomness are
functions of (seed, step), so no RNG or data-loader state needs saving.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created

PREFIX = "checkpoint-"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save(
    root: Path,
    step: int,
    lora: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Writes checkpoint-<step> atomically, then prunes the oldest beyond total_limit."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{PREFIX}{step}-"))
    try:
        save_file({k: v.contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, tmp / name)
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        as_if_created(tmp)  # mkdtemp makes 0700
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        for old in checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find(root: Path, which: str) -> Path | None:
    """'latest' -> newest checkpoint under root (None if there is none); otherwise a checkpoint folder path."""
    if which == "latest":
        found = checkpoints(root)
        return found[-1] if found else None
    p = Path(which)
    if not p.is_absolute() and not p.exists():
        p = root / which
    if not (p / "state.json").is_file():
        raise UserError(
            f"--resume_from_checkpoint {which}: {p} is not a checkpoint folder; use 'latest' or a "
            f"{PREFIX}N folder under {root}"
        )
    return p


def load(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(step, raw LoRA weights, trainer state, meta) of a checkpoint folder."""
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    lora = load_file(path / "lora.safetensors")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return int(meta["step"]), lora, state, meta


def save_training_state(
    root: Path,
    step: int,
    net: Any,
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    rank: int,
    alpha: int,
    meta: dict[str, Any],
    total_limit: int | None,
    scratch: Path,
) -> Path:
    """A checkpoint of a training run: raw LoRA, optimizer/scheduler/scaler states and the exported LoRA file."""
    from sd3booth.adapters import lora

    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".ckpt-lora-") as tmp:
        exported = lora.save_lora(net, Path(tmp), rank, alpha)
        return save(
            root,
            step,
            lora.lora_state(net),
            state,
            meta,
            extra_files={lora.LORA_FILE: exported},
            total_limit=total_limit,
        )
