"""Command-line flags, one per setting, merged over the --config file."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sd3booth.config.checks import validate
from sd3booth.config.files import load_config_file
from sd3booth.config.settings import FIELDS, TrainConfig


class BoolFlag(argparse.Action):
    """``--flag``, ``--no-flag``, and ``--flag true|false`` as the diffusers script's ``type=bool`` flags are
    written (``--prodigy_decouple True``)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        names = [n for o in option_strings for n in (o, "--no-" + o[2:])]
        super().__init__(names, dest, nargs="?", metavar="true|false", **kw)

    def __call__(self, parser: Any, ns: Any, values: Any, option_string: str | None = None) -> None:
        if (option_string or "").startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"takes no value, got {values!r}")
            setattr(ns, self.dest, False)
            return
        word = "true" if values is None else str(values).lower()
        if word not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise argparse.ArgumentError(self, f"expects true or false, got {values!r}")
        setattr(ns, self.dest, word in ("true", "1", "yes", "on"))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per TrainConfig field. Defaults are suppressed so we know which flags were given."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    parser.add_argument("--config", help="TOML or JSON file of settings (keys = flag names); flags override it.")
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group", "training")
        g = groups.setdefault(group, parser.add_argument_group(group))
        kind = str(f.type)
        help_text = f.metadata["help"] + f" [default: {f.default}]"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if kind.startswith("bool"):
            g.add_argument(f"--{f.name}", action=BoolFlag, **kw)
            continue
        if kind.startswith("list"):  # repeatable: --validation_prompt a --validation_prompt b
            kw["action"] = "append"
        kw["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
            kw["type"] = str.lower
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        g.add_argument(f"--{f.name}", **kw)
    # The diffusers script spells optimizers AdamW/prodigy; accept both via type=str.lower above.


def build_config(cli_values: dict[str, Any]) -> TrainConfig:
    """Merges defaults, the --config file and explicit flags (flags win), then validates."""
    values: dict[str, Any] = {}
    if cli_values.get("config"):
        values.update(load_config_file(cli_values["config"]))
    values.update({k: v for k, v in cli_values.items() if k in FIELDS})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg
