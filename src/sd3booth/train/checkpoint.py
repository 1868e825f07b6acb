"""Resumable training state: written whole into a temporary folder, then renamed into place.

A checkpoint holds everything the loop needs to continue bit-exactly: the raw adapter weights, the
optimizer, LR-scheduler and grad-scaler states (and the EMA, when there is one) and the step. Data order
and per-step randomness are functions of (seed, step), so no RNG or data-loader state needs saving.

Before writing, the free space is checked (one line instead of a half-written folder); a write that is
killed anyway leaves only a hidden temporary folder, which ``clean_interrupted`` removes at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sd3booth.cache.store import check_free_space
from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created

PREFIX = "checkpoint-"
# hidden temporaries of an interrupted write: checkpoint folders (here) and the loop's LoRA export (OUTPUT_DIR)
TEMPORARY_PATTERNS = (("checkpoints", f".{PREFIX}*"), (".", ".ckpt-lora-*"), (".", ".lora-*"))


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "state.json").is_file()
    ]
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
    needed = _nbytes(lora) + _nbytes(trainer_state) + sum(p.stat().st_size for p in (extra_files or {}).values())
    check_free_space(
        root,
        needed + 65536,
        final.name,
        "free some space (or keep fewer with --checkpoints_total_limit), then continue with "
        "--resume_from_checkpoint latest",
    )
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


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors anywhere in a nested state dict (what torch.save and save_file write)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 64


def open_output(output_dir: Path) -> list[Path]:
    """Creates a run's output folder, or cleans the one it continues: see ``clean_interrupted``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return clean_interrupted(output_dir)


def clean_interrupted(output_dir: Path) -> list[Path]:
    """Removes the temporary folders and files an interrupted checkpoint or LoRA write left in a run's output
    folder (a run owns its output folder, so none of them is being written now); returns what it removed."""
    removed = []
    for sub, pattern in TEMPORARY_PATTERNS:
        folder = output_dir / sub
        for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def damage(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from (None if it looks whole): reads state.json, the
    safetensors header and the trainer state's zip directory, which a truncated or damaged file breaks."""
    import zipfile

    from sd3booth.models.files import damage as tensor_damage

    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            return "state.json has no step"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"state.json: {type(e).__name__}: {e}"
    if not (path / "lora.safetensors").is_file():
        return "lora.safetensors is missing"
    reason = tensor_damage(path / "lora.safetensors")
    if reason:
        return f"lora.safetensors: {reason}"
    state = path / "trainer_state.pt"
    try:
        with zipfile.ZipFile(state) as z:
            if not z.namelist():
                return "trainer_state.pt is empty"
    except (OSError, zipfile.BadZipFile) as e:
        return f"trainer_state.pt: {type(e).__name__}: {e}"
    return None


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


def read_meta(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder ({} if unreadable: ``damage`` reports that)."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(step, raw LoRA weights, trainer state, meta) of a checkpoint folder; a damaged one is a UserError."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        lora = load_file(path / "lora.safetensors")
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        return int(meta["step"]), lora, state, meta
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same to the user
        raise UserError(damaged_message(path, f"{type(e).__name__}: {e}")) from None


def damaged_message(path: Path, reason: str) -> str:
    earlier = [p for p in checkpoints(path.parent) if p != path and int(p.name[len(PREFIX) :]) < _step_of(path)]
    advice = (
        f"resume from the one before with --resume_from_checkpoint {earlier[-1]}, or delete {path}"
        if earlier
        else f"delete {path} and start again"
    )
    return f"checkpoint {path} is damaged ({reason}); {advice}".replace("\n", " ")


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return 2**62


def save_training_state(
    root: Path,
    step: int,
    raw: dict[str, torch.Tensor],
    export: Callable[[Path], list[Path]],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    meta: dict[str, Any],
    total_limit: int | None,
    scratch: Path,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint of a training run: the raw adapter weights, optimizer/scheduler/scaler states (plus
    ``extra_state``, e.g. the EMA) and the exported adapter file(s) that ``export(folder)`` writes."""
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **(extra_state or {}),
    }
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".ckpt-lora-") as tmp:
        exported = export(Path(tmp))
        return save(root, step, raw, state, meta, extra_files={p.name: p for p in exported}, total_limit=total_limit)
