"""``--dataset_config FILE.toml``: several concepts in one run, one ``[[datasets]]`` entry each.

Each entry takes the per-concept settings under their flag names; a key an entry leaves out takes the flag's
value, so the flags stay a shorthand for a file with one entry. Relative paths are relative to the file.

    [[datasets]]
    instance_data_dir = "photos/dog"
    instance_prompt = "a photo of sks dog"
    class_data_dir = "class/dog"
    class_prompt = "a photo of a dog"

    [[datasets]]
    instance_data_dir = "photos/mug"
    instance_prompt = "a photo of zwx mug"
    repeats = 3
    resolution = 768
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from sd3booth.config.files import _coerce, closest
from sd3booth.errors import UserError

DATASET_KEYS = (
    "instance_data_dir",
    "instance_prompt",
    "repeats",
    "resolution",
    "class_data_dir",
    "class_prompt",
    "num_class_images",
    "prior_loss_weight",
    "mask_dir",
)
PATH_KEYS = ("instance_data_dir", "class_data_dir", "mask_dir")


def _check_entry(entry: dict[str, Any], where: str) -> None:
    if not entry.get("instance_data_dir"):
        raise UserError(f"{where} has no instance_data_dir; every entry needs the folder of its images")
    if "resolution" in entry and (entry["resolution"] < 16 or entry["resolution"] % 16):
        raise UserError(f"{where}: resolution {entry['resolution']} must be a positive multiple of 16")
    for name in ("repeats", "num_class_images"):
        if name in entry and entry[name] < 1:
            raise UserError(f"{where}: {name} must be at least 1, got {entry[name]}")
    if entry.get("prior_loss_weight", 0.0) < 0:
        raise UserError(f"{where}: prior_loss_weight must not be negative, got {entry['prior_loss_weight']}")


def read_dataset_config(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a dataset config, typed and checked, paths made absolute; one-line UserError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--dataset_config {p} does not exist; pass a .toml file with [[datasets]] entries")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--dataset_config {p} is not valid TOML: {e}".replace("\n", " ")) from None
    for key in raw:
        if key != "datasets":
            raise UserError(f"{p}: unknown key '{key}'{closest(key, ['datasets'])}; the file holds [[datasets]] only")
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{p} has no [[datasets]] entries; add one per concept, each with its instance_data_dir")
    out = []
    for number, entry in enumerate(entries, start=1):
        where = f"{p} [[datasets]] entry {number}"
        typed: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in DATASET_KEYS:
                raise UserError(f"{where}: unknown key '{key}'{closest(key, DATASET_KEYS)}; remove or rename it")
            typed[key] = _coerce(key, value, where)
            if key in PATH_KEYS and typed[key] is not None:
                typed[key] = str((p.parent / typed[key]).resolve())
        _check_entry(typed, where)
        out.append(typed)
    return out
