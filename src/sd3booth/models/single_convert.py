"""A single-file SD3 (plus separate encoder files) as a diffusers folder, written once and found again by content.

Everything downstream (loaders, memory plan, caches) reads diffusers folders, so the files are converted once
into ``$SD3BOOTH_MODEL_CACHE`` (default ``~/.cache/sd3booth/single-file``) under a hash of their contents and
of the configs; a later run with the same files finds the folder in a second. The transformer and VAE go
through diffusers' ``from_single_file`` (its key conversion, our config folder); the text encoders are
stored in transformers' own layout under a prefix, so stripping it is the whole conversion (diffusers does
the same). fp8 encoder weights (``t5xxl_fp8_e4m3fn``, also the ``scaled_fp8`` variant) are widened to bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created, user_cache_root
from sd3booth.models.single_file import ENCODER_FOLDERS, ModelFiles, SafetensorsFile, TransformerShape

CONVERSION_VERSION = "1"  # bump when the written folder changes meaning
_FP8 = {"F8_E4M3", "F8_E5M2"}


def model_cache_root() -> Path:
    env = os.environ.get("SD3BOOTH_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "single-file"


def folder_identity(folder: Path) -> str:
    """Hash of every small file's content (configs, tokenizers): what a config source contributes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.stat().st_size < 64 * 2**20 and ".cache" not in p.parts:
            if p.suffix in (".safetensors", ".bin", ".pt"):
                continue
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _read(f: SafetensorsFile, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` with it stripped; fp8 widened to bf16 (times ``scale_weight`` when present)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(f.path), framework="pt") as st:
        for key, t in f.tensors.items():
            if key.startswith(prefix):
                out[key[len(prefix) :]] = st.get_tensor(key)
                if t.dtype in _FP8:
                    out[key[len(prefix) :]] = out[key[len(prefix) :]].to(torch.bfloat16)
    for key in [k for k in out if k.endswith(".scale_weight")]:
        scale = out.pop(key)
        w = key[: -len(".scale_weight")] + ".weight"
        out[w] = (out[w].float() * scale.float()).to(torch.bfloat16)
    out.pop("scaled_fp8", None)
    return out


def _dtype(f: SafetensorsFile, prefix: str) -> torch.dtype:
    """The part's most common float storage type (fp8 counts as bf16, which it is widened to)."""
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    counts: dict[torch.dtype, int] = {}
    for k, t in f.tensors.items():
        if k.startswith(prefix) and not k.endswith("scale_weight"):
            d = torch.bfloat16 if t.dtype in _FP8 else names.get(t.dtype)
            if d is not None:
                counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _check_transformer_config(config: dict[str, Any], shape: TransformerShape, source: Path) -> None:
    want = {
        "num_layers": shape.num_layers,
        "caption_projection_dim": shape.hidden,
        "pos_embed_max_size": shape.pos_embed_max_size,
        "dual_attention_layers": list(shape.dual_attention_layers),
        "qk_norm": "rms_norm" if shape.qk_norm else None,
    }
    have = {k: (list(config.get(k) or []) if k == "dual_attention_layers" else config.get(k)) for k in want}
    bad = [f"{k} {have[k]} (file: {want[k]})" for k in want if have[k] != want[k]]
    if bad:
        raise UserError(
            f"the configs in {source} do not fit the single file ({shape.describe()}): {', '.join(bad)}; pass "
            "--single_file_config with the diffusers folder or hub id of the same model"
        )


def _encoder(files: ModelFiles, which: str, config_dir: Path, out: Path) -> None:
    """One text encoder from its file into ``out``, checked against the config source's architecture."""
    from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

    f, prefix = files.parts[which]
    state = _read(f, prefix)
    state.pop("text_model.embeddings.position_ids", None)
    config = AutoConfig.from_pretrained(config_dir)
    cls = T5EncoderModel if which == "t5xxl" else CLIPTextModelWithProjection
    if which == "t5xxl":
        state.setdefault("shared.weight", state.get("encoder.embed_tokens.weight"))
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    elif "text_projection.weight" not in state and getattr(config, "projection_dim", None) == config.hidden_size:
        state["text_projection.weight"] = torch.eye(config.hidden_size)  # SD3's CLIP-L pools unprojected
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        got = {k: tuple(v.shape) for k, v in state.items() if k in expected}
        raise UserError(
            f"{f.path} does not fit the {which} of {config_dir.parent.name or config_dir} ({len(wrong)} tensors "
            f"missing or of another shape, e.g. {wrong[0]} {got.get(wrong[0], 'absent')}); is it the {which} file?"
        )
    dtype = torch.bfloat16 if which == "t5xxl" and _dtype(f, prefix) == torch.float16 else _dtype(f, prefix)
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, assign=True)
    model.save_pretrained(out)


def _transformer(files: ModelFiles, config_dir: Path, out: Path) -> None:
    from diffusers import SD3Transformer2DModel

    f, prefix = files.parts["transformer"]
    state = {f"model.diffusion_model.{k}": v for k, v in _read(f, prefix).items()}
    model = SD3Transformer2DModel.from_single_file(
        state, config=str(config_dir), subfolder="transformer", torch_dtype=_dtype(f, prefix), local_files_only=True
    )
    model.save_pretrained(out / "transformer")


def _vae(files: ModelFiles, config_dir: Path, out: Path) -> None:
    from diffusers import AutoencoderKL

    f, prefix = files.parts["vae"]
    state = {f"first_stage_model.{k}": v for k, v in _read(f, prefix).items()}
    model = AutoencoderKL.from_single_file(
        state, config=str(config_dir), subfolder="vae", torch_dtype=_dtype(f, prefix), local_files_only=True
    )
    model.save_pretrained(out / "vae")


def _needed_bytes(files: ModelFiles) -> int:
    total = 0
    for f, prefix in files.parts.values():
        for k, t in f.tensors.items():
            if k.startswith(prefix):
                total += (t.end - t.start) * (2 if t.dtype in _FP8 else 1)
    return total


def materialise(files: ModelFiles, config_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The diffusers folder of these files and configs: found by content, else written once (atomically)."""
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"):
        if not (config_dir / sub).is_dir():
            raise UserError(f"{config_dir} lacks '{sub}'; --single_file_config needs a diffusers SD3 folder or hub id")
    parts = files.identities()
    key = hashlib.sha256(json.dumps([parts, folder_identity(config_dir), CONVERSION_VERSION]).encode()).hexdigest()
    root = model_cache_root()
    final = root / key[:24]
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    need = _needed_bytes(files)
    free = shutil.disk_usage(root).free
    if need > free:
        raise UserError(
            f"converting {files.main.path.name} needs {need / 2**30:.1f} GiB free in {root} ({free / 2**30:.1f} "
            "free); set SD3BOOTH_MODEL_CACHE to a folder on a larger disk"
        )
    cfg = json.loads((config_dir / "transformer" / "config.json").read_text(encoding="utf-8"))
    _check_transformer_config(cfg, files.shape, config_dir)
    log(f"converting {files.main.path.name} once to a diffusers folder in {final} ({need / 2**30:.1f} GiB)")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key[:24]}-"))
    try:
        _transformer(files, config_dir, tmp)
        _vae(files, config_dir, tmp)
        for which, folder in ENCODER_FOLDERS.items():
            if which in files.parts:
                _encoder(files, which, config_dir / folder, tmp / folder)
        for sub in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
            if (config_dir / sub).is_dir():
                shutil.copytree(config_dir / sub, tmp / sub)
        index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
        if "t5xxl" not in files.parts:
            index.pop("text_encoder_3", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        sources = {p: str(f.path.resolve()) for p, (f, _) in files.parts.items()}
        record = {"sources": sources, "identities": parts, "config": str(config_dir)}
        (tmp / "sd3booth_source.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        as_if_created(tmp)
        if (final / "model_index.json").is_file():  # another process finished the same conversion first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
