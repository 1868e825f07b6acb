"""What a finished run leaves for others: the LoRA file(s) with their metadata, a hub model card, the upload.

The safetensors header says what the file is (base model, resolution, rank, alpha, steps, trigger prompt,
sd3booth version) in sd3booth's own keys plus the SAI ``modelspec.*`` keys and kohya's ``ss_network_*``, which
ComfyUI, Forge/A1111 and kohya's tools display.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd3booth import __version__
from sd3booth.adapters import layouts, lora
from sd3booth.config import TrainConfig
from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMAT_FILES = {"kohya": "lora_kohya.safetensors", "comfyui": "lora_comfyui.safetensors"}
RUN_FILES = (lora.LORA_FILE, *FORMAT_FILES.values(), "README.md")  # what a finished run leaves at the top level


TITLES = {"sd3-medium": "SD3 Medium", "sd3.5-medium": "SD3.5 Medium", "sd3.5-large": "SD3.5 Large"}


def _base_model(cfg: TrainConfig) -> str:
    """The hub id as given, or the local folder / single file as an absolute path."""
    base = cfg.pretrained_model_name_or_path or ""
    return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base


def model_variant(model_root: Path) -> str:
    """sd3-medium, sd3.5-medium or sd3.5-large from the transformer config (kohya's modelspec naming below)."""
    cfg = json.loads((model_root / "transformer" / "config.json").read_text(encoding="utf-8"))
    if cfg.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if cfg.get("num_layers") == 38 else "sd3-medium"


def saved_layers(path: Path) -> list[str]:
    """The transformer layer kinds a diffusers adapter file holds (``attn.to_q``…; with --init_lora they come
    from that file); empty for a LyCORIS file."""
    with safe_open(str(path), framework="pt") as f:
        keys = [k.split(".lora_A.")[0] for k in f.keys() if k.startswith("transformer.") and ".lora_A." in k]  # noqa: SIM118
    return sorted({re.sub(r"^transformer\.(transformer_blocks\.\d+\.)?", "", k) for k in keys})


def lora_metadata(cfg: TrainConfig, model_root: Path, steps: int, layers: list[str]) -> dict[str, str]:
    variant = model_variant(model_root)
    arch = {"sd3-medium": "3-medium", "sd3.5-medium": "3-5-medium", "sd3.5-large": "3-5-large"}[variant]
    base = _base_model(cfg)
    kind = "lora" if cfg.adapter_type in ("lora", "dora") else "lycoris"
    return {
        "sd3booth.version": __version__,
        "sd3booth.type": cfg.adapter_type,
        "sd3booth.base_model": base,
        "sd3booth.base_model_variant": variant,
        "sd3booth.resolution": str(cfg.resolution),
        "sd3booth.rank": str(cfg.rank),
        "sd3booth.alpha": f"{cfg.alpha} (folded into lora_B: the file loads with alpha = rank)",
        "sd3booth.steps": str(steps),
        "sd3booth.instance_prompt": cfg.instance_prompt or "",
        "sd3booth.lora_layers": ",".join(layers or cfg.target_layers),
        "sd3booth.text_encoder_lora": str(cfg.train_text_encoder).lower(),
        "sd3booth.lora_blocks": cfg.lora_blocks or "all",
        "sd3booth.learning_rate": str(cfg.learning_rate),
        "sd3booth.seed": str(cfg.seed),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"stable-diffusion-{arch}/{kind}",
        "modelspec.implementation": "diffusers",
        "modelspec.title": Path(cfg.output_dir).resolve().name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.now(UTC).date().isoformat(),
        "modelspec.trigger_phrase": cfg.instance_prompt or "",
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.rank),
    }


def _rewrite(path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """The file again in ``dtype`` (float tensors; alpha scalars stay fp32) with ``metadata`` in its header."""
    with safe_open(str(path), framework="pt") as f:
        meta = {**(f.metadata() or {}), **metadata}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    cast = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in cast.items()}, tmp, metadata=meta)
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finalize(cfg: TrainConfig, paths: list[Path], model_root: Path, steps: int) -> Path:
    """The exported adapter files (adapters.formats) in --save_precision with the run's metadata, plus the
    --lora_format copy (kohya or ComfyUI layout) of a LoRA; returns the file of the asked-for layout."""
    dtype = torch.float32 if cfg.upcast_before_saving else PRECISIONS[cfg.save_precision]
    meta = lora_metadata(cfg, model_root, steps, saved_layers(paths[0]))
    for p in paths:
        _rewrite(p, dtype, meta)
    if cfg.lora_format == "diffusers":
        return paths[0]
    lf = layouts.read_lora(paths[0])
    target = paths[0].parent / FORMAT_FILES[cfg.lora_format]
    return layouts.write_lora(lf.modules, target, cfg.lora_format, dtype, meta)


def _widget(cfg: TrainConfig, out: Path, folders: list[Path]) -> list[dict[str, Any]]:
    if not folders:
        return []
    images = sorted(folders[-1].glob("*.png"))
    text = cfg.validation_prompt or cfg.instance_prompt or " "
    return [{"text": text, "output": {"url": str(p.relative_to(out).as_posix())}} for p in images]


def write_model_card(cfg: TrainConfig, out: Path, model_root: Path, folders: list[Path], steps: int) -> Path:
    """README.md in the hub's format (YAML card data via huggingface_hub, a gallery of the last validation)."""
    from huggingface_hub import ModelCard, ModelCardData

    variant = model_variant(model_root)
    base = _base_model(cfg)
    name = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    tags = ["text-to-image", "diffusers-training", "diffusers", "lora", "template:sd-lora", "sd3booth",
            variant.replace("sd3-medium", "sd3"), f"{variant.split('-')[0]}-diffusers"]  # fmt: skip
    data = ModelCardData(
        license="other",
        library_name="diffusers",
        base_model=base if "/" in base and not Path(base).expanduser().exists() else None,
        instance_prompt=cfg.instance_prompt,
        widget=_widget(cfg, out, folders) or None,
        tags=tags,
    )
    prompt = cfg.validation_prompt or cfg.instance_prompt or "a photo"
    with safe_open(str(out / lora.LORA_FILE), framework="pt") as f:
        layers = (f.metadata() or {}).get("sd3booth.lora_layers", "")
    extra = "".join(f"\n- `{f}`: {fmt} layout" for fmt, f in FORMAT_FILES.items() if (out / f).is_file())
    body = f"""
# {TITLES[variant]} DreamBooth LoRA - {name}

<Gallery />

## Model description

DreamBooth LoRA weights for `{base}`, trained with sd3booth {__version__}: rank {cfg.rank},
alpha {cfg.alpha} (folded into the weights, so the file loads with alpha = rank), {steps} steps at
{cfg.resolution} px, learning rate {cfg.learning_rate}, layers `{layers}`.

## Trigger words

Use `{cfg.instance_prompt}` to trigger the image generation.

## Files

- `pytorch_lora_weights.safetensors`: diffusers layout (diffusers, ComfyUI){extra}
- `settings.json`: every setting of the run; `validation/`: the validation images

## Use it with diffusers

```py
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{name}", weight_name="pytorch_lora_weights.safetensors")
image = pipe("{prompt}").images[0]
```

Or `sd3booth generate --lora pytorch_lora_weights.safetensors --prompt "{prompt}"`.

## License

Follow the license of the base model `{base}`.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = out / "README.md"
    card.save(path)
    return path


def publish(cfg: TrainConfig, out: Path, model_root: Path, folders: list[Path], steps: int, log: Any = print) -> None:
    """The model card, then (with --push_to_hub) the upload."""
    write_model_card(cfg, out, model_root, folders, steps)
    if cfg.push_to_hub:
        push_to_hub(out, cfg.hub_model_id or out.resolve().name, cfg.hub_token, log)


def push_to_hub(out: Path, repo_id: str, token: str | None, log: Any = print) -> str:
    """Uploads the output folder (not checkpoints, caches or logs) with huggingface_hub; one line on failure."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(offline_message(out))
    api = huggingface_hub.HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo,
            folder_path=out,
            commit_message="End of training",
            ignore_patterns=["checkpoints/**", "cache/**", "logs/**", ".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - network, auth and permission failures all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"--push_to_hub: uploading {out} to {repo_id} failed ({type(e).__name__}: {first[:150]}); the run is "
            f"saved; upload it later with: hf upload {repo_id} {out}"
        ) from None
    log(f"uploaded {out} to https://huggingface.co/{repo}")
    return repo


def offline_message(out: Path) -> str:
    return (
        f"--push_to_hub needs the network, but the hub is offline (HF_HUB_OFFLINE is set); unset it, or drop "
        f"--push_to_hub and upload {out} later with huggingface-cli upload"
    )
