"""settings.json: the resolved settings of a run and the library versions, beside its outputs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def write_settings(cfg: TrainConfig, out: Path) -> None:
    record = {"settings": portable_settings(cfg), "versions": versions(), "written": datetime.now(UTC).isoformat()}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
