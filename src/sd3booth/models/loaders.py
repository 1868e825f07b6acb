"""Loading SD3 components one at a time, in the precision and on the device the placement says.

Every stage asks this module for exactly the component it needs and frees it when done
(:func:`free`), so at most one large model sits on the GPU at a time.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import torch

from sd3booth.errors import UserError
from sd3booth.models import direct
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource

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
    folder = src.root / f"text_encoder{sub}"
    if index < 3:
        # read from the file onto the device through one staging buffer: no mapped file in host memory
        model = direct.load_model(CLIPTextModelWithProjection, folder, src.variant, place.text_dtype, place.device)
        if model is None:  # no safetensors weights: the library's loader
            model = CLIPTextModelWithProjection.from_pretrained(
                folder, dtype=place.text_dtype, device_map={"": place.device}, **kw
            )
    elif place.memory.t5 in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        q = (
            BitsAndBytesConfig(load_in_8bit=True)
            if place.memory.t5 == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=place.t5_dtype)
        )
        # bf16 where the card has it; in fp16 transformers keeps T5's FFN `wo` in fp32 (+2 GB), where T5 overflows
        model = T5EncoderModel.from_pretrained(
            folder,
            dtype=place.t5_dtype,
            quantization_config=q,
            device_map={"": place.device},
            **kw,
        )
    elif place.memory.t5 == "stream":
        from accelerate import cpu_offload

        # bf16 weights stay in CPU memory; accelerate's hooks copy each layer in just before it runs.
        model = T5EncoderModel.from_pretrained(folder, dtype=place.t5_dtype, **kw)
        cpu_offload(model, execution_device=place.device)
    else:  # resident: read from the file onto its device (the 9.5 GB file was mapped into host RSS, issue #10)
        model = direct.load_model(T5EncoderModel, folder, src.variant, place.t5_dtype, place.t5_device)
        if model is None:
            model = T5EncoderModel.from_pretrained(folder, dtype=place.t5_dtype, device_map={"": place.t5_device}, **kw)
    model.requires_grad_(False).eval()
    return tok, model


def load_vae(src: ModelSource, place: Placement) -> Any:
    from diffusers import AutoencoderKL

    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    vae = direct.load_model(AutoencoderKL, src.root / "vae", src.variant, place.vae_dtype, place.device)
    if vae is None:
        vae = AutoencoderKL.from_pretrained(src.root / "vae", torch_dtype=place.vae_dtype, **kw)
    if place.memory.vae_tiling:
        # half-size tiles: the config's own tile size is the full 1024 training size, which tiles nothing
        vae.enable_tiling()
        vae.tile_sample_min_size = vae.config.sample_size // 2
        vae.tile_latent_min_size = vae.tile_sample_min_size // 8
    return vae.to(place.device).requires_grad_(False).eval()


def load_transformer(src: ModelSource, place: Placement) -> Any:
    """The frozen transformer in the plan's storage: bf16/fp32 on the device, or NF4 via bitsandbytes.

    fp8 storage is applied later by :func:`apply_fp8_storage`, after the LoRA is added, so the adapter's
    own weights are never cast. Weights are read from the safetensors files through one staging buffer
    (:mod:`sd3booth.models.direct`), never mapped; the frozen Linear weights of blocks to be swapped are read
    straight into the swapper's exact-size pinned packs (``model.swap_packs``, taken by
    :func:`attach_memory_savers`), so they never touch the GPU and the model is never copied whole to the host.
    """
    from diffusers import SD3Transformer2DModel

    kw: dict[str, Any] = {"variant": src.variant} if src.variant else {}
    if place.memory.base == "nf4" and place.device.type == "cuda":
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
    folder, swap = src.root / "transformer", place.memory.swap_blocks
    if not swap:  # straight from the file to the device, through one staging buffer
        model = direct.load_model(SD3Transformer2DModel, folder, src.variant, place.weight_dtype, place.device)
        if model is None:
            model = SD3Transformer2DModel.from_pretrained(
                folder, torch_dtype=place.weight_dtype, device_map=str(place.device), **kw
            )
        return model.requires_grad_(False)
    # swapped blocks' frozen Linear weights straight from the file into the swapper's host packs, the rest to
    # the device: never a full host copy of the model
    fp8 = place.memory.swap_dtype == "fp8"
    model = direct.load_swapped_transformer(
        SD3Transformer2DModel, folder, src.variant, place.weight_dtype, place.device, range(swap), fp8
    )
    if model is not None:
        return model.requires_grad_(False)
    if fp8:
        raise UserError(f"--swap_dtype fp8 needs safetensors weights; {folder} has none")
    model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=place.weight_dtype, **kw)
    model.requires_grad_(False)
    for i, block in enumerate(model.transformer_blocks):
        if i >= swap:
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
    if place.memory.base != "fp8":
        return
    skip = ("pos_embed", "patch_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out", "lora_")
    model.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=place.weight_dtype, skip_modules_pattern=skip
    )


def apply_fp8_compute(model: Any) -> str:
    """``--base_compute fp8``: the frozen GEMMs of the blocks become fp8 matmuls (models.fp8_compute)."""
    from sd3booth.models.fp8_compute import apply_fp8_compute as convert

    return f"fp8 compute: {convert(model.transformer_blocks)} frozen layers of the blocks in e4m3 (row-wise scales)"


def attach_memory_savers(model: Any, place: Placement) -> Any:
    """Block swap and (selective) gradient checkpointing as the plan says; returns the swapper or None.

    The first ``checkpoint_blocks`` blocks are recomputed; swapped blocks are the first ``swap_blocks``, so
    every swapped block is also recomputed (autograd then holds none of its weights across the step).
    """
    from sd3booth.models.offload import BlockSwapper, selective_checkpointing

    blocks = model.transformer_blocks
    if place.memory.checkpoint_blocks:
        chosen = range(min(place.memory.checkpoint_blocks, len(blocks)))
        model.enable_gradient_checkpointing(gradient_checkpointing_func=selective_checkpointing(chosen, blocks))
    if place.memory.swap_blocks:
        packs = model.__dict__.pop("swap_packs", None)  # read from the file by load_transformer
        swapped = range(min(place.memory.swap_blocks, len(blocks)))
        swapper = BlockSwapper(blocks, swapped, place.device, packs=packs, fp8=place.memory.swap_dtype == "fp8")
        model.to(place.device)  # what stays resident in swapped blocks (LoRA, norms) joins the rest on the GPU
        _return_host_memory()  # host copies the swapper replaced (packed from loaded weights, or LoRA moved over)
        return swapper
    return None


def load_for_sampling(src: ModelSource, place: Placement) -> Any:
    """The frozen transformer for sampling (``generate``, class images) as the plan stores it: the swapped blocks
    streamed in by a block swapper exactly as in training (its hooks keep it alive), the rest on the device."""
    model = load_transformer(src, place)
    attach_memory_savers(model, place)  # checkpointing saves nothing without grad: only the swap matters here
    return model


def load_scheduler(src: ModelSource) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(src.root / "scheduler")


def vae_latent_params(src: ModelSource) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from the VAE config, without loading weights."""
    cfg = json.loads((src.root / "vae" / "config.json").read_text(encoding="utf-8"))
    return float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"])


def free(*models: Any) -> None:
    """Drops references the caller passes in, collects, and returns cached GPU memory to the driver and freed
    host memory to the system.

    A streamed T5 keeps its weights in accelerate's offload hooks, which ``.to("meta")`` does not reach: without
    removing the hooks its 9 GB stayed in host memory for the rest of the run (measured, issue #10)."""
    for m in models:
        if (
            isinstance(m, torch.nn.Module)
            and hasattr(m, "_hf_hook")
            or any(hasattr(x, "_hf_hook") for x in (m.modules() if isinstance(m, torch.nn.Module) else []))
        ):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(m, recurse=True)
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
    _return_host_memory()


def _return_host_memory() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim hands it back so RSS reflects what is live."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, GiB (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
