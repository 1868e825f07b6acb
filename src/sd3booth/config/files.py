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
    """'did you mean' text for an unknown name: the closest spellings, and the names it abbreviates."""
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    stem = name.rstrip("-_")
    if len(stem.lstrip("-")) >= 2:  # an abbreviation (argparse no longer expands them) names what it could mean
        matches += [k for k in known if k.startswith(stem) and k != name and k not in matches]
    matches = matches[:3]
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _looks_like_yaml(text: str) -> bool:
    """True if most setting lines read ``key: value`` (YAML) rather than ``key = value`` (TOML)."""
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    colon = sum(1 for x in lines if ":" in x and "=" not in x.split(":", 1)[0])
    return bool(lines) and colon > len(lines) / 2


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML or JSON settings file; every key must be a setting name. Every failure is one UserError."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a folder; pass a .toml or .json file to --config")
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass an existing .toml or .json file to --config")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise UserError(
            f"config file {p} is YAML, which sd3booth does not read; write it as TOML (run.toml, lines like "
            "rank = 16) or JSON (run.json) with the same keys"
        )
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read config file {p} ({e.strerror or e}); check its permissions") from None
    kind = "JSON" if suffix == ".json" else "TOML"
    try:
        raw = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        hint = "; it looks like YAML: write it as TOML (key = value) or JSON" if _looks_like_yaml(text) else ""
        only = "" if suffix in (".toml", ".json") else " (--config reads .toml and .json files)"
        raise UserError(f"config file {p} is not valid {kind}{only}: {e}{hint}".replace("\n", " ")) from None
    if isinstance(raw, dict) and isinstance(raw.get("settings"), dict):
        raw = raw["settings"]  # settings.json nests them
    if not isinstance(raw, dict):
        raise UserError(
            f"config file {p} holds a {type(raw).__name__}, not a table of settings; write one object like "
            '{"rank": 16, "learning_rate": 1e-4} (keys are flag names)'
        )
    out = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise UserError(f"{p}: unknown setting '{key}'{closest(key, list(FIELDS))}; remove or rename it")
        out[key] = _coerce(key, value, str(p))
    return out
