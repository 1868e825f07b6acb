"""settings.json: what a run actually used, written only once the run has produced something.

It is written (atomically) right after each checkpoint and after the final LoRA, never before: a run that
fails before saving anything leaves no settings.json, so the same command can simply be run again, and a
failed resume leaves the old one untouched. It holds

- ``settings``: every setting of the latest run segment (pass the file back to ``--config`` to repeat it);
- ``data``: the dataset's fingerprint (number of images, hash of image bytes and captions) that a resume
  is checked against;
- ``history``: one entry per start, ``{"step": 0, ...}`` for the first and one per resume with the step it
  resumed at, the checkpoint, and every setting it changed as ``[old, new]``;
- ``step`` (the last step saved), ``finished``, ``versions`` and ``written``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sd3booth import __version__
from sd3booth.cache.store import atomic_write_bytes
from sd3booth.config import TrainConfig

SETTINGS_FILE = "settings.json"


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {
        "sd3booth": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


# settings that name files or folders: stored absolute, so settings.json works from any folder
LOCAL_PATHS = ("instance_data_dir", "class_data_dir", "output_dir", "cache_dir", "clip_l", "clip_g", "t5xxl",
               "init_lora")  # fmt: skip
PATHS_OR_HUB_IDS = ("pretrained_model_name_or_path", "dataset_name", "single_file_config", "resume_from_checkpoint")


def portable_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as settings.json keeps them: local paths absolute (hub ids and 'latest' as given), and no
    hub token."""
    values = cfg.to_dict()
    for name in (*LOCAL_PATHS, *PATHS_OR_HUB_IDS):
        value = values.get(name)
        if value and (name in LOCAL_PATHS or Path(value).expanduser().exists()):
            values[name] = str(Path(value).expanduser().resolve())
    if "hub_token" in values:
        values["hub_token"] = None
    return values


def read(output_dir: Path) -> dict[str, Any] | None:
    """The settings.json of an output folder, or None if there is none or it cannot be read."""
    try:
        record = json.loads((Path(output_dir) / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunRecord:
    """settings.json of the run in progress; ``save`` writes it (main process only)."""

    def __init__(self, output_dir: Path, record: dict[str, Any]) -> None:
        self.path = Path(output_dir) / SETTINGS_FILE
        self.record = record

    @classmethod
    def begin(cls, cfg: TrainConfig, output_dir: Path, examples: Sequence[Any], resume_path: Path | None) -> RunRecord:
        """The record of a run starting now on ``examples`` (from step 0, or the checkpoint's step); writes
        nothing."""
        from sd3booth.data.dataset import file_digest
        from sd3booth.train import checkpoint, resume

        settings = portable_settings(cfg)
        data = resume.data_fingerprint(examples, file_digest)
        start_step = 0
        history: list[dict[str, Any]] = []
        entry: dict[str, Any] = {}
        if resume_path is not None:
            meta = checkpoint.read_meta(resume_path)
            start_step = int(meta.get("step", 0))
            previous = read(output_dir) or {}
            history = [h for h in previous.get("history", []) if isinstance(h, dict)]
            old = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
            entry = {"resumed_from": str(resume_path), "changed": resume.changed(old, settings)}
        entry = {"step": start_step, "started": _now(), **entry}
        record = {
            "settings": settings,
            "data": data,
            "history": [*history, entry],
            "step": start_step,
            "finished": False,
            "versions": versions(),
        }
        return cls(output_dir, record)

    def save(self, step: int, finished: bool = False) -> None:
        """Writes settings.json whole (a temporary file, then a rename)."""
        self.record.update(step=step, finished=finished, written=_now())
        atomic_write_bytes(self.path, (json.dumps(self.record, indent=2) + "\n").encode("utf-8"))
