"""Loading SD3 components one at a time, with precision, quantisation and placement decided here.

Every stage asks this module for exactly the component it needs and frees it when done
(:func:`free`), so at most one large model sits on the GPU at a time. The memory issue's planner
will extend :class:`Placement`; nothing else decides dtypes or devices.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd3booth.errors import UserError

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}
COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3")


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


# ---- placement and precision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and in which precision each stage runs. One instance per run, built by :func:`plan_placement`."""

    device: torch.device
    weight_dtype: torch.dtype  # frozen transformer and VAE weights during training
    mixed_precision: str  # "no" | "fp16" | "bf16" (autocast; LoRA params stay fp32)
    text_dtype: torch.dtype  # CLIP encoders
    t5_precision: str  # bf16 | int8 | nf4 | cpu | none
    vae_dtype: torch.dtype

    @property
    def t5_device(self) -> torch.device:
        return torch.device("cpu") if self.t5_precision == "cpu" else self.device


def default_mixed_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def plan_placement(device: torch.device, mixed_precision: str | None, t5_precision: str) -> Placement:
    """Decides every dtype from the device and the user's precision flags."""
    mp = mixed_precision or default_mixed_precision(device)
    if device.type != "cuda":
        if t5_precision in ("int8", "nf4"):
            raise UserError(f"--t5_precision {t5_precision} needs a CUDA GPU (bitsandbytes); use bf16 or cpu")
        if mp == "fp16":
            raise UserError("--mixed_precision fp16 needs a GPU; use no or bf16 on the CPU")
    weight = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # CLIP runs in the training precision (fp32 on CPU); the SD3 VAE overflows in fp16, so it stays fp32
    # there (as the reference does) and bf16 otherwise.
    vae = torch.float32 if mp in ("no", "fp16") else torch.bfloat16
    return Placement(
        device=device,
        weight_dtype=weight,
        mixed_precision=mp,
        text_dtype=weight,
        t5_precision=t5_precision,
        vae_dtype=vae,
    )


# ---- loaders ---------------------------------------------------------------------------------------------


def _missing(src: ModelSource, component: str) -> None:
    if not (src.root / component).is_dir():
        raise UserError(f"{src.root} lacks the '{component}' folder; the SD3 checkpoint is incomplete")


def load_text_encoder(src: ModelSource, index: int, place: Placement) -> tuple[Any, Any]:
    """(tokenizer, encoder) for encoder 1 (CLIP-L), 2 (CLIP-G) or 3 (T5-XXL), on its device, eval mode."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    sub = "" if index == 1 else f"_{index}"
    _missing(src, f"text_encoder{sub}")
    tok = AutoTokenizer.from_pretrained(src.root / f"tokenizer{sub}", revision=src.revision)
    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    if index < 3:
        model = CLIPTextModelWithProjection.from_pretrained(
            src.root / f"text_encoder{sub}", dtype=place.text_dtype, **kw
        )
        model.to(place.device)
    elif place.t5_precision in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        q = (
            BitsAndBytesConfig(load_in_8bit=True)
            if place.t5_precision == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        )
        # bf16, not fp16: in fp16 transformers keeps T5's FFN `wo` in fp32 (+2 GB) and T5 overflows.
        model = T5EncoderModel.from_pretrained(
            src.root / "text_encoder_3",
            dtype=torch.bfloat16,
            quantization_config=q,
            device_map={"": place.device},
            **kw,
        )
    else:
        dtype = (
            torch.float32 if place.t5_device.type == "cpu" and place.weight_dtype == torch.float32 else torch.bfloat16
        )
        model = T5EncoderModel.from_pretrained(src.root / "text_encoder_3", dtype=dtype, **kw)
        model.to(place.t5_device)
    model.requires_grad_(False).eval()
    return tok, model


def load_vae(src: ModelSource, place: Placement) -> Any:
    from diffusers import AutoencoderKL

    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    vae = AutoencoderKL.from_pretrained(src.root / "vae", torch_dtype=place.vae_dtype, **kw)
    return vae.to(place.device).requires_grad_(False).eval()


def load_transformer(src: ModelSource, place: Placement, device: torch.device | None = None) -> Any:
    from diffusers import SD3Transformer2DModel

    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    model = SD3Transformer2DModel.from_pretrained(src.root / "transformer", torch_dtype=place.weight_dtype, **kw)
    return model.to(device or place.device).requires_grad_(False)


def load_scheduler(src: ModelSource) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(src.root / "scheduler")


def vae_latent_params(src: ModelSource) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from the VAE config, without loading weights."""
    cfg = json.loads((src.root / "vae" / "config.json").read_text(encoding="utf-8"))
    return float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"])


def free(*models: Any) -> None:
    """Drops references the caller passes in, collects, and returns cached GPU memory to the driver."""
    for m in models:
        if (
            m is not None
            and hasattr(m, "to")
            and not getattr(m, "is_loaded_in_8bit", False)
            and not getattr(m, "is_loaded_in_4bit", False)
        ):
            try:
                m.to("meta")
            except Exception:  # noqa: BLE001 - best effort; the gc below still frees it
                pass
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, GiB (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
