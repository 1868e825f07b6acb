"""What a run folder holds, read for the report: every file is optional, so a report can be made at any point
of a run (after the first validation, at the end) or of any older run folder.

Files read: ``settings.json`` (settings and versions), ``metrics.jsonl`` (loss, lr, s/step, peak GPU memory per
logged step), ``stages.json`` (time and peak GPU / host memory of each stage), ``plan.json`` (the memory plan),
``validation/step-N/*.png``, and, where a run recorded them, ``buckets.json`` and ``cache.json`` (any JSON: a
list of objects, an object of objects or an object of values is shown as a table).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3booth.config import TrainConfig
from sd3booth.train.settings import versions

LORA_FILE = "pytorch_lora_weights.safetensors"
OPTIONAL_TABLES = {"buckets.json": "Aspect-ratio buckets", "cache.json": "Cache hits"}
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunFolder:
    """Everything the report shows, as plain data."""

    out: Path
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    validation: dict[int, list[Path]] = field(default_factory=dict)  # step -> images, sorted by name
    tables: dict[str, Any] = field(default_factory=dict)  # title -> JSON of an optional file
    lora: Path | None = None

    @property
    def last_step(self) -> int:
        steps = [m["step"] for m in self.metrics if "step" in m] + list(self.validation)
        return max(steps, default=0)

    @property
    def max_steps(self) -> int | None:
        return self.settings.get("max_train_steps")


def _json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or half-written (the run may be writing it right now)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records; a line being written (not yet valid JSON) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def validation_images(root: Path) -> dict[int, list[Path]]:
    """validation/step-N/*.png by step."""
    found: dict[int, list[Path]] = {}
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            images = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if images:
                found[int(m.group(1))] = images
    return dict(sorted(found.items()))


def changed_settings(settings: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, value, default) of every setting that differs from TrainConfig's default, in the table's order."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name not in settings:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if settings[f.name] != default:
            out.append((f.name, settings[f.name], default))
    return out


def read_run(
    out: Path, stages: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None
) -> RunFolder:
    """The run folder ``out``; ``stages`` and ``settings`` (of a run in progress) replace stages.json and the
    settings in settings.json, which a run writes only at the end and once it has saved something."""
    out = Path(out)
    record = _json(out / "settings.json")
    record = record if isinstance(record, dict) else {}
    run = RunFolder(out)
    run.settings = settings if settings is not None else record.get("settings", {})
    run.versions = record.get("versions") or (versions() if settings is not None else {})
    run.metrics = read_metrics(out / "metrics.jsonl")
    saved = _json(out / "stages.json")
    run.stages = list(stages) if stages is not None else (saved if isinstance(saved, list) else [])
    plan = _json(out / "plan.json")
    run.plan = plan if isinstance(plan, dict) else {}
    run.validation = validation_images(out / "validation")
    for name, title in OPTIONAL_TABLES.items():
        data = _json(out / name)
        if data:
            run.tables[title] = data
    run.lora = out / LORA_FILE if (out / LORA_FILE).is_file() else None
    return run
