"""settings.json: the resolved settings of a run and the library versions, beside its outputs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from sd3booth import __version__
from sd3booth.config import TrainConfig

SETTINGS_FILE = "settings.json"


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {
        "sd3booth": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def write_settings(cfg: TrainConfig, out: Path) -> None:
    record = {"settings": cfg.to_dict(), "versions": versions(), "written": datetime.now(UTC).isoformat()}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
