"""``sd3booth generate``: images from the base model plus any number of LoRAs (any of the three layouts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sd3booth.errors import UserError
from sd3booth.lora_cli import parse_weighted

T5_CHOICES = ["auto", "bf16", "int8", "nf4", "stream", "cpu", "none"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="PNGs from the base model plus LoRAs.")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="A LoRA file (diffusers, kohya or ComfyUI layout; or a run's output folder) and its weight (default "
        "1.0); repeat to mix several.",
    )
    p.add_argument("--prompt", required=True, help="What to draw.")
    p.add_argument("--negative_prompt", default="", help="What to steer away from. [default: none]")
    p.add_argument(
        "--pretrained_model_name_or_path",
        help="Base model: folder, hub id or single file (default: the training run's, from settings.json beside "
        "the first LoRA or its metadata).",
    )
    for name in ("clip_l", "clip_g", "t5xxl", "single_file_config"):
        p.add_argument(f"--{name}", help=f"As for train, for a single-file base model (default: the run's --{name}).")
    p.add_argument("--num_images", type=int, default=4, help="Images to write. [default: 4]")
    p.add_argument("--seed", type=int, default=0, help="Seed of the first image; image i uses seed + i. [default: 0]")
    p.add_argument("--num_inference_steps", type=int, default=28, help="Sampling steps. [default: 28]")
    p.add_argument("--guidance_scale", type=float, default=7.0, help="Classifier-free guidance. [default: 7.0]")
    p.add_argument("--width", type=int, help="Image width, a multiple of 16 (default: --resolution).")
    p.add_argument("--height", type=int, help="Image height, a multiple of 16 (default: --resolution).")
    p.add_argument("--resolution", type=int, help="Square size when --width/--height are not given (default: the "
                   "training resolution, else the model's native size).")  # fmt: skip
    p.add_argument(
        "--max_sequence_length", type=int, help="T5 tokens of the prompt (default: the training run's, else 256)."
    )
    p.add_argument(
        "--t5_precision",
        choices=T5_CHOICES,
        help="How T5 runs while the prompt is encoded (default: the training run's, else auto = the planner's).",
    )
    p.add_argument("--output_dir", default="generated", help="Where the PNGs go. [default: generated]")
    p.add_argument("--cache_dir", help="Text-embedding cache (default: OUTPUT_DIR/cache).")
    p.add_argument(
        "--num_cpu_threads", type=int, help="CPU threads for torch (default on a CPU-only machine: see train --help)."
    )
    return p


def _lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]``; PATH may be a run's output folder holding pytorch_lora_weights.safetensors."""
    path, weight = parse_weighted(spec, "--lora")
    if path.is_dir():
        if not (path / LORA_FILE).is_file():
            raise UserError(f"--lora {path} is a folder without {LORA_FILE}; pass the LoRA file, or a run's folder")
        path = path / LORA_FILE
    return path, weight


def _run_settings(first: Path | None, metadata: dict[str, str]) -> dict[str, Any]:
    """The training run's settings: settings.json beside the first LoRA, else the base model in its metadata."""
    if first is None:
        return {}
    beside = first.parent / "settings.json"
    if beside.is_file():
        try:
            record = json.loads(beside.read_text(encoding="utf-8"))
            settings = record.get("settings", {}) if isinstance(record, dict) else {}
            return settings if isinstance(settings, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"warning: {beside} cannot be read ({type(e).__name__}); its settings are not used", file=sys.stderr)
    base = metadata.get("sd3booth.base_model")
    return {"pretrained_model_name_or_path": base} if base else {}


def _check(ns: argparse.Namespace, max_len: int) -> None:
    for name in ("num_images", "num_inference_steps", "num_cpu_threads", "width", "height", "resolution"):
        v = getattr(ns, name)
        if v is not None and (v < 16 or v % 16 if name in ("width", "height", "resolution") else v < 1):
            want = "a positive multiple of 16 (VAE factor 8 x patch size 2)" if v >= 1 else "at least 1"
            raise UserError(f"--{name} {v} must be {want}")
    if not 1 <= max_len <= 512:
        raise UserError(f"--max_sequence_length must be between 1 and 512, got {max_len}")
    if ns.guidance_scale < 0:
        raise UserError(f"--guidance_scale must not be negative, got {ns.guidance_scale}")


def run(ns: argparse.Namespace) -> int:
    from sd3booth.adapters import layouts
    from sd3booth.config import TrainConfig
    from sd3booth.models import placement, source
    from sd3booth.models.threads import configure_threads
    from sd3booth.sample import generate_with_lora

    source.quiet_libraries()
    _check(ns, ns.max_sequence_length or 256)
    loras = [_lora_spec(s) for s in ns.lora]
    metas = [layouts.open_state(p, "--lora")[1] for p, _w in loras]  # every file checked before a model loads
    settings = _run_settings(loras[0][0] if loras else None, metas[0] if metas else {})
    model = ns.pretrained_model_name_or_path or settings.get("pretrained_model_name_or_path")
    if not model:
        raise UserError("generate: no base model: no settings.json beside the LoRA names one; pass "
                        "--pretrained_model_name_or_path")  # fmt: skip
    configure_threads(ns.num_cpu_threads, not torch.cuda.is_available())
    max_len = ns.max_sequence_length or settings.get("max_sequence_length") or 256
    _check(ns, max_len)
    files = {k: getattr(ns, k) or settings.get(k) for k in ("clip_l", "clip_g", "t5xxl", "single_file_config")}
    src = source.resolve_model(model, **files)
    largest, native = source.resolution_limits(src)  # the default fits the model's position embedding
    resolution = ns.resolution or settings.get("resolution") or min(x for x in (native or 1024, largest) if x)
    width, height = ns.width or resolution, ns.height or resolution
    source.check_resolution(src, width, "--width" if ns.width else "--resolution")
    source.check_resolution(src, height, "--height" if ns.height else "--resolution")
    # the placement the training run got (its settings, else a default run's), so both share text-cache entries
    run_cfg = TrainConfig(
        pretrained_model_name_or_path=model,
        resolution=max(width, height),
        t5_precision=ns.t5_precision or settings.get("t5_precision") or "auto",
        max_sequence_length=max_len,
        mixed_precision=settings.get("mixed_precision"),
    )
    if not (src.root / "text_encoder_3").is_dir() and run_cfg.t5_precision != "none":
        raise UserError(f"{model} has no T5-XXL encoder: pass --t5xxl FILE or --t5_precision none")
    place = placement.place_run(run_cfg, src.root, placement.detect_device())
    out = Path(ns.output_dir)
    paths = generate_with_lora(
        src, loras, ns.prompt, ns.negative_prompt, out, ns.num_images, ns.seed, ns.num_inference_steps,
        ns.guidance_scale, (width, height), max_len, place, Path(ns.cache_dir) if ns.cache_dir else out / "cache",
    )  # fmt: skip
    for p in paths:
        print(p)
    return 0
