"""What the settings mean once combined: the derived views every stage reads from a TrainConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sd3booth.config.interop import SINGLE_FILE_FLAGS

DEFAULT_LORA_LAYERS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class SettingsViews:
    """Properties of :class:`sd3booth.config.settings.TrainConfig` computed from its fields."""

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    @property
    def adapter_type(self) -> str:
        return "dora" if self.use_dora else self.lora_type

    @property
    def base_model_prior(self) -> bool:
        return self.with_prior_preservation and self.prior_preservation_mode == "base_model"

    @property
    def class_images(self) -> bool:
        return self.with_prior_preservation and self.prior_preservation_mode == "class_images"

    @property
    def optimizer_name(self) -> str:
        return "adamw8bit" if self.use_8bit_adam else self.optimizer

    @property
    def target_layers(self) -> list[str]:
        if not self.lora_layers:
            return list(DEFAULT_LORA_LAYERS)
        return [s.strip() for s in self.lora_layers.split(",") if s.strip()]

    @property
    def target_blocks(self) -> list[int] | None:
        if not self.lora_blocks:
            return None
        return [int(s) for s in self.lora_blocks.split(",") if s.strip()]

    @property
    def validation_prompts(self) -> list[str]:
        """--validation_prompt as a list (a TrainConfig built in code may hold one string)."""
        v = self.validation_prompt
        return [v] if isinstance(v, str) else list(v or [])

    @property
    def data_dir(self) -> str | None:
        return self.instance_data_dir or self.dataset_name

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    @property
    def model_files(self) -> dict[str, str | None]:
        """The single-file flags, as keyword arguments of ``models.source.resolve_model``."""
        return {name: getattr(self, name) for name in SINGLE_FILE_FLAGS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
