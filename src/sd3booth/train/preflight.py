"""Checks of a training run that need no model weights, beyond the flag checks in ``config.validate``.

``check`` runs at the end of ``loop.verify``, before anything is created or changed: output and cache
folders that cannot be written (read-only mount, immutable or foreign folder), an output folder holding
another run's checkpoints, packages the chosen settings need, a resolution the model cannot take, and a
resume whose checkpoint is damaged or was trained with other run-defining settings (``resume``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sd3booth.config import TrainConfig
from sd3booth.errors import UserError
from sd3booth.models.source import ModelSource, check_resolution
from sd3booth.train import checkpoint, resume
from sd3booth.train import settings as run_settings


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, flag: str) -> None:
    """UserError unless ``path`` (a folder, maybe not created yet) can be created and written."""
    base = _existing_ancestor(path)
    if not base.is_dir() or os.access(base, os.W_OK | os.X_OK):
        return  # a file on the way is reported by loop.verify's own check
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "a read-only file system" if read_only else "no permission to write there"
    raise UserError(f"{flag} {path}: cannot write in {base} ({why}); choose a folder you can write to")


PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt"), "adamw8bit": ("bitsandbytes", "bitsandbytes")}


def check_packages(cfg: TrainConfig) -> None:
    """UserError if the optimizer needs a package that is not installed."""
    need = PACKAGES.get(cfg.optimizer_name)
    if need and importlib.util.find_spec(need[0]) is None:
        raise UserError(f"--optimizer {cfg.optimizer_name} needs the '{need[1]}' package; pip install {need[1]}")


def check(cfg: TrainConfig, src: ModelSource) -> Path | None:
    """Every check above; returns the checkpoint a resume starts from (None for a new run). Writes nothing."""
    out = Path(cfg.output_dir)
    check_writable(out, "--output_dir")
    check_writable(cfg.cache_path, "--cache_dir")
    if cfg.with_prior_preservation and cfg.class_data_dir:
        check_writable(Path(cfg.class_data_dir), "--class_data_dir")
    check_packages(cfg)
    check_resolution(src, cfg.resolution)
    if not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir and checkpoint.checkpoints(out / "checkpoints"):
        raise UserError(
            f"--output_dir {out} holds another run's checkpoints; continue it with --resume_from_checkpoint latest, "
            "replace it with --overwrite_output_dir (the cache is kept), or choose another folder"
        )
    examples = None
    if cfg.resume_from_checkpoint and Path(cfg.data_dir or "").is_dir():
        from sd3booth.prepare import scan_data

        examples = scan_data(cfg, log=lambda m: None)
    return resume.check_resume(cfg, out, examples, run_settings.read(out))
