"""Where an SD3 checkpoint is: a local diffusers folder or a hub id, checked before anything loads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sd3booth.errors import UserError

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}


def quiet_libraries() -> None:
    """Silences the libraries' info chatter and per-load progress bars; our own progress bar stays."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved SD3 checkpoint: a local diffusers folder (hub ids are downloaded to the HF cache first)."""

    root: Path
    name: str
    revision: str | None = None
    variant: str | None = None

    def identity(self, component: str) -> str:
        """A short hash that changes when the component's config or weight files change.

        Hashing file names, sizes and mtimes instead of contents keeps this instant for 10 GB files.
        """
        h = hashlib.sha256(component.encode())
        folder = self.root / component
        for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
                if p.suffix == ".json" and st.st_size < 1_000_000:
                    h.update(p.read_bytes())
        h.update(f"{self.variant}".encode())
        return h.hexdigest()[:16]


def resolve_model(name_or_path: str, revision: str | None = None, variant: str | None = None) -> ModelSource:
    """Finds the checkpoint folder and checks it is an SD3 diffusers pipeline; UserError otherwise."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".safetensors", ".ckpt") and p.is_file():
        raise UserError(
            f"{p} is a single-file checkpoint; convert it once with diffusers "
            "(StableDiffusion3Pipeline.from_single_file(...).save_pretrained(DIR)) and pass DIR"
        )
    if not p.exists():
        if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
            raise UserError(f"model {name_or_path} not found: pass a local SD3 diffusers folder or a hub id")
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=None))
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
            raise UserError(
                f"could not get model {name_or_path} from the hub ({type(e).__name__}); "
                "check the id, your login (huggingface-cli login) and network, or pass a local folder"
            ) from None
    index = p / "model_index.json"
    if not index.is_file():
        raise UserError(f"{p} is not a diffusers pipeline folder (no model_index.json); pass an SD3 checkpoint")
    try:
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except json.JSONDecodeError:
        raise UserError(f"{index} is not valid JSON; the checkpoint is damaged") from None
    if cls not in SD3_PIPELINES:
        raise UserError(f"{p} holds a {cls}, not an SD3 model; pass an SD3 / SD3.5 checkpoint")
    for comp in ("transformer", "vae", "scheduler"):
        if not (p / comp).is_dir():
            raise UserError(f"{p} lacks the '{comp}' folder; the SD3 checkpoint is incomplete")
    return ModelSource(root=p, name=name_or_path, revision=revision, variant=variant)
