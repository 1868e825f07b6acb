"""The saved adapter files, in the formats other tools read without conversion.

* LoRA and DoRA: diffusers' ``pytorch_lora_weights.safetensors`` (``transformer.<module>.lora_A/lora_B.weight``,
  DoRA adds ``.lora_magnitude_vector``; CLIP LoRAs under ``text_encoder.``/``text_encoder_2.``), which
  ``StableDiffusion3Pipeline.load_lora_weights`` and ComfyUI read. alpha/rank is folded into ``lora_B``.
* DoRA for ComfyUI: ComfyUI ignores ``lora_magnitude_vector`` and diffusers drops ComfyUI's ``dora_scale`` (it
  warns and filters it out), so no single file serves both; ``pytorch_lora_weights_comfyui.safetensors`` holds
  the same LoRA with ``dora_scale``. ComfyUI normalises an output-axis ``dora_scale`` by the row norms of the
  *base* weight, where DoRA (peft, the paper) divides by those of the merged weight, so the magnitude is
  stored as m * ||W|| / ||W + dW||: ComfyUI's merge then equals the trained model's.
* LoHa and LoKr: LyCORIS' own layout, ``lycoris_<module path with _>.{hada_w1_a,…|lokr_w1,…}`` and ``.alpha``,
  the format SimpleTuner writes for SD3, which ComfyUI maps for SD3 models and lycoris-lora reads back.
  peft and LyCORIS agree on the scale alpha/rank except for a LoKr whose two factors are both full matrices,
  which LyCORIS and ComfyUI apply at scale 1: that scale is folded into ``lokr_w1``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from sd3booth.adapters.build import AdapterSpec
from sd3booth.fileio import as_if_created

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_FILE = "pytorch_lora_weights_comfyui.safetensors"
RAW_SUFFIX = "_raw"  # the un-averaged weights beside an EMA file: pytorch_lora_weights_raw.safetensors
LYCORIS_PREFIX = "lycoris_"
COMFY_EPS = torch.finfo(torch.float32).eps  # ComfyUI adds it to the norm it divides by (it merges in fp32)


def _peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}


def lora_layers(model: torch.nn.Module, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """peft names, alpha/rank folded into lora_B (loaders assume alpha = rank); DoRA magnitudes unchanged."""
    out = {}
    for k, v in _peft_state(model).items():
        out[k] = v * spec.scale if spec.scale != 1.0 and ".lora_B." in k else v
    return out


def lycoris_layers(model: torch.nn.Module, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """LoHa/LoKr weights in LyCORIS' layout, one ``.alpha`` per module."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in _peft_state(model).items():
        module, param = k.rsplit(".", 1)
        grouped.setdefault(module, {})[param] = v
    out = {}
    for module, params in grouped.items():
        name = LYCORIS_PREFIX + module.replace(".", "_")
        full_lokr = "lokr_w1" in params and "lokr_w2" in params
        for param, v in params.items():
            out[f"{name}.{param}"] = v * spec.scale if full_lokr and param == "lokr_w1" else v
        out[f"{name}.alpha"] = torch.tensor(float(spec.alpha))
    return out


def _base_weights(transformer_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's own weights of some Linear layers (what ComfyUI merges into), read lazily from disk."""
    index = transformer_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        files = sorted(transformer_dir.glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1] or files
        where = {f"{n}.weight": plain[0].name for n in names}
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(where[f"{n}.weight"], []).append(n)
    for fname, group in by_file.items():
        with safe_open(transformer_dir / fname, framework="pt") as f:
            for n in group:
                out[n] = f.get_tensor(f"{n}.weight").float()
    return out


def comfy_dora_layers(layers: dict[str, torch.Tensor], transformer_dir: Path) -> dict[str, torch.Tensor]:
    """The exported DoRA layers (``lora_layers``) with ``lora_magnitude_vector`` turned into ComfyUI's
    ``dora_scale`` (out, 1), compensated for ComfyUI dividing by the base weight's row norms (module doc)."""
    modules = [k.removesuffix(".lora_magnitude_vector") for k in layers if k.endswith(".lora_magnitude_vector")]
    base = _base_weights(transformer_dir, modules)
    out = {k: v for k, v in layers.items() if not k.endswith(".lora_magnitude_vector")}
    for m in modules:
        w = base[m]
        merged = w + layers[f"{m}.lora_B.weight"] @ layers[f"{m}.lora_A.weight"]
        magnitude = layers[f"{m}.lora_magnitude_vector"]
        scale = magnitude * (w.norm(dim=1) + COMFY_EPS) / merged.norm(dim=1)
        out[f"{m}.dora_scale"] = scale.reshape(-1, 1)
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        as_if_created(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_adapter(
    out_dir: Path,
    transformer: torch.nn.Module,
    spec: AdapterSpec,
    text_encoders: dict[str, torch.nn.Module] | None = None,
    transformer_dir: Path | None = None,
    suffix: str = "",
) -> list[Path]:
    """Writes the adapter file(s) of a run into out_dir; returns their paths, the main file first.

    ``text_encoders`` maps ``text_encoder``/``text_encoder_2`` to CLIP models carrying a LoRA; ``transformer_dir``
    (the base model's transformer folder) is needed for the ComfyUI DoRA file.
    """
    te = {name: _peft_state(enc) for name, enc in (text_encoders or {}).items()}
    main = out_dir / LORA_FILE.replace(".safetensors", f"{suffix}.safetensors")
    if spec.kind in ("loha", "lokr"):
        flat_te = {f"{name}.{k}": v for name, state in te.items() for k, v in state.items()}
        meta = {"format": "pt", "sd3booth_adapter": spec.kind, "rank": str(spec.rank), "alpha": str(spec.alpha)}
        return [_atomic_save({**lycoris_layers(transformer, spec), **flat_te}, main, meta)]
    layers = lora_layers(transformer, spec)
    paths = [_save_diffusers(layers, te, main)]
    if spec.kind == "dora" and transformer_dir is not None:
        comfy = comfy_dora_layers(layers, transformer_dir)
        paths.append(_save_diffusers(comfy, te, out_dir / COMFY_FILE.replace(".safe", f"{suffix}.safe")))
    return paths


def _save_diffusers(layers: dict[str, torch.Tensor], te: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """diffusers' own writer (it adds the ``transformer.``/``text_encoder.`` prefixes), written whole then renamed."""
    from diffusers import StableDiffusion3Pipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        StableDiffusion3Pipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=layers,
            text_encoder_lora_layers=te.get("text_encoder"),
            text_encoder_2_lora_layers=te.get("text_encoder_2"),
            weight_name=path.name,
        )
        os.replace(Path(tmp) / path.name, path)
    return path
