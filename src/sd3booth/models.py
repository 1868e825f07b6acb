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
    """Where and in which precision each stage runs: the one object every stage asks. Built by
    :func:`plan_placement` from the device, the precision flags and the memory plan (``plan.Plan``)."""

    device: torch.device
    weight_dtype: torch.dtype  # compute dtype of the frozen transformer (its storage too when base is bf16)
    mixed_precision: str  # "no" | "fp16" | "bf16" (autocast; LoRA params stay fp32)
    text_dtype: torch.dtype  # CLIP encoders
    t5_precision: str  # bf16 | int8 | nf4 | stream | cpu | none
    vae_dtype: torch.dtype
    base: str = "bf16"  # transformer storage: bf16 (= weight_dtype) | fp8 | nf4
    checkpoint_blocks: int = 0
    swap_blocks: int = 0
    activation_offload: bool = False
    vae_tiling: bool = False
    text_batch: int = 8

    @property
    def t5_device(self) -> torch.device:
        return torch.device("cpu") if self.t5_precision == "cpu" else self.device


def default_mixed_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def plan_placement(device: torch.device, mixed_precision: str | None, t5_precision: str, plan: Any = None) -> Placement:
    """Decides every dtype and placement from the device, the user's precision flags and the memory plan."""
    mp = mixed_precision or default_mixed_precision(device)
    t5 = plan.t5 if plan is not None else ("bf16" if t5_precision == "auto" else t5_precision)
    base = plan.base if plan is not None else "bf16"
    if device.type != "cuda":
        if t5 in ("int8", "nf4") or base == "nf4":
            raise UserError("NF4 and int8 weights need a CUDA GPU (bitsandbytes); use bf16 or cpu on this machine")
        if mp == "fp16":
            raise UserError("--mixed_precision fp16 needs a GPU; use no or bf16 on the CPU")
        if t5 == "stream":
            t5 = "cpu"  # nothing to stream to
    weight = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # The SD3 VAE overflows in fp16, so it stays fp32 there (as the reference does) and bf16 otherwise.
    vae = torch.float32 if mp in ("no", "fp16") else torch.bfloat16
    extra: dict[str, Any] = {}
    if plan is not None:
        extra = dict(
            base=base,
            checkpoint_blocks=plan.checkpoint_blocks,
            swap_blocks=plan.swap_blocks,
            activation_offload=plan.activation_offload,
            vae_tiling=plan.vae_tiling,
            text_batch=plan.text_batch,
        )
    return Placement(
        device=device,
        weight_dtype=weight,
        mixed_precision=mp,
        text_dtype=weight,
        t5_precision=t5,
        vae_dtype=vae,
        **extra,
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
    elif place.t5_precision == "stream":
        from accelerate import cpu_offload

        # bf16 weights stay in CPU memory; accelerate's hooks copy each layer in just before it runs.
        model = T5EncoderModel.from_pretrained(src.root / "text_encoder_3", dtype=torch.bfloat16, **kw)
        cpu_offload(model, execution_device=place.device)
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
    if place.vae_tiling:
        # half-size tiles: the config's own tile size is the full 1024 training size, which tiles nothing
        vae.enable_tiling()
        vae.tile_sample_min_size = vae.config.sample_size // 2
        vae.tile_latent_min_size = vae.tile_sample_min_size // 8
    return vae.to(place.device).requires_grad_(False).eval()


def load_transformer(src: ModelSource, place: Placement) -> Any:
    """The frozen transformer in the plan's storage: bf16/fp32 on the device, or NF4 via bitsandbytes.

    fp8 storage is applied later by :func:`apply_fp8_storage`, after the LoRA is added, so the adapter's
    own weights are never cast. Blocks to be swapped stay on the host, so they never touch the GPU.
    """
    from diffusers import SD3Transformer2DModel

    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    if place.base == "nf4" and place.device.type == "cuda":
        from diffusers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=place.weight_dtype)
        model = SD3Transformer2DModel.from_pretrained(
            src.root / "transformer",
            torch_dtype=place.weight_dtype,
            quantization_config=q,
            device_map=str(place.device),
            **kw,
        )
        return model.requires_grad_(False)
    model = SD3Transformer2DModel.from_pretrained(src.root / "transformer", torch_dtype=place.weight_dtype, **kw)
    model.requires_grad_(False)
    if not place.swap_blocks:
        return model.to(place.device)
    for i, block in enumerate(model.transformer_blocks):
        if i >= place.swap_blocks:
            block.to(place.device)
    for name, child in model.named_children():
        if name != "transformer_blocks":
            child.to(place.device)
    return model


def apply_fp8_storage(model: Any, place: Placement) -> None:
    """fp8 (e4m3) storage of the transformer's Linear weights, computed in the training dtype.

    diffusers' default skip list matches the AdaLN ``norm*.linear`` layers (a third of the model); this one
    skips only embeddings, the output layers and the LoRA adapters (sd3-facts §5).
    """
    if place.base != "fp8":
        return
    skip = ("pos_embed", "patch_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out", "lora_")
    model.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=place.weight_dtype, skip_modules_pattern=skip
    )


def attach_memory_savers(model: Any, place: Placement) -> Any:
    """Block swap and (selective) gradient checkpointing as the plan says; returns the swapper or None.

    The first ``checkpoint_blocks`` blocks are recomputed; swapped blocks are the first ``swap_blocks``, so
    every swapped block is also recomputed (autograd then holds none of its weights across the step).
    """
    from sd3booth.offload import BlockSwapper, selective_checkpointing

    blocks = model.transformer_blocks
    if place.checkpoint_blocks:
        chosen = range(min(place.checkpoint_blocks, len(blocks)))
        model.enable_gradient_checkpointing(gradient_checkpointing_func=selective_checkpointing(chosen, blocks))
    if place.swap_blocks:
        swapper = BlockSwapper(blocks, range(min(place.swap_blocks, len(blocks))), place.device)
        model.to(place.device)  # what stays resident in swapped blocks (LoRA, norms) joins the rest on the GPU
        return swapper
    return None


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
