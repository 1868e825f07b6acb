"""Typed settings for a training run: defaults < config file (TOML or JSON) < command-line flags.

No torch here: this package must import in milliseconds so that bad settings fail before anything heavy
loads (litgpt's "verify settings first"). ``settings`` holds the table of every setting; ``files`` reads
config files, ``args`` the flags, ``checks`` the consistency checks.
"""

from sd3booth.config.args import add_train_arguments, build_config
from sd3booth.config.checks import validate
from sd3booth.config.compat import compat_notes
from sd3booth.config.files import closest, load_config_file
from sd3booth.config.settings import (
    ATTENTION_BACKENDS,
    BASE_PRECISIONS,
    DEFAULT_LORA_LAYERS,
    FIELDS,
    LORA_FORMATS,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    REPORTERS,
    SAVE_PRECISIONS,
    T5_PRECISIONS,
    WEIGHTING_SCHEMES,
    TrainConfig,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "BASE_PRECISIONS",
    "DEFAULT_LORA_LAYERS",
    "FIELDS",
    "LORA_FORMATS",
    "LR_SCHEDULERS",
    "MIXED_PRECISIONS",
    "OPTIMIZERS",
    "REPORTERS",
    "SAVE_PRECISIONS",
    "T5_PRECISIONS",
    "WEIGHTING_SCHEMES",
    "TrainConfig",
    "add_train_arguments",
    "build_config",
    "closest",
    "compat_notes",
    "load_config_file",
    "validate",
]
