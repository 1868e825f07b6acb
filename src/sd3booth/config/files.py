"""Settings files (TOML, JSON, a run's settings.json): read, checked key by key, typed."""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

from sd3booth.config.settings import FIELDS
from sd3booth.errors import UserError


def _coerce(name: str, value: Any, source: str) -> Any:
    """Converts a config-file value to the field's type; bad types become a UserError."""
    f = FIELDS[name]
    kind = str(f.type)
    if value is None:
        return None
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("list"):  # a list of strings; one string is a list of one
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise TypeError
            return values
        if kind.startswith("str"):
            if name in ("lora_layers", "lora_blocks") and isinstance(value, list):
                return ",".join(str(v) for v in value)
            if not isinstance(value, str):
                raise TypeError
            return value.lower() if "choices" in f.metadata else value
    except (TypeError, ValueError):
        pass
    raise UserError(f"{source}: '{name}' should be {kind.split(' ')[0]}, got {value!r}; fix the value")


def closest(name: str, known: list[str] | tuple[str, ...]) -> str:
    """'did you mean' text for an unknown name."""
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML or JSON settings file; every key must be a setting name."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass an existing .toml or .json file to --config")
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"config file {p} is not valid {p.suffix.lstrip('.').upper() or 'TOML'}: {e}") from None
    raw = raw.get("settings", raw) if isinstance(raw, dict) else raw  # settings.json nests them
    out = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise UserError(f"{p}: unknown setting '{key}'{closest(key, list(FIELDS))}; remove or rename it")
        out[key] = _coerce(key, value, str(p))
    return out
