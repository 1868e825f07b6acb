"""Single-file SD3 checkpoints (``sd3.5_large.safetensors``, ``sd3_medium_incl_clips_t5xxlfp8.safetensors``) and
encoder files kept apart (``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``).

Only safetensors headers are read here: which parts a file holds, which SD3 it is, and a content identity for
cache keys. :mod:`sd3booth.models.single_convert` turns the files into a diffusers folder once.

Single files carry no tokenizers and no configs. As diffusers' ``from_single_file`` does, they come from a
diffusers folder or hub repo (``--single_file_config``; default: Stability's repo of the detected model,
configs and tokenizers only, from the HF cache or the hub).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sd3booth.errors import UserError

# where each part sits in a file that bundles them (SD3 single files as Stability and ComfyUI write them)
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
VAE_PREFIXES = ("first_stage_model.", "vae.")
BUNDLED_ENCODERS = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
ENCODER_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
# Stability's diffusers repos for each architecture (the same table as diffusers' single-file loader)
CONFIG_REPOS = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
_CLIP_KEY = "text_model.embeddings.token_embedding.weight"
_T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
_SAMPLED_TENSORS = 64
_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def under(self, prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: t for k, t in self.tensors.items() if k.startswith(prefix)}


def read_header(path: Path, flag: str) -> SafetensorsFile:
    """The tensor table of a safetensors file (no data read); one-line UserError for anything else."""
    if path.is_dir() or not path.is_file():
        raise UserError(f"{flag} {path} is not a file; pass a .safetensors file")
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 2**20:
                raise ValueError
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        pickle = path.suffix in (".ckpt", ".pt", ".bin", ".pth")
        kind = "a pickle checkpoint (.ckpt/.pt)" if pickle else "not safetensors"
        raise UserError(f"{flag} {path} is {kind}; pass a .safetensors file") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {
        k: Tensor(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
    }
    return SafetensorsFile(path, tensors, meta)


def tensor_identity(f: SafetensorsFile, prefix: str) -> str:
    """A content hash of the tensors under ``prefix``: names, dtypes and shapes, plus 4 KiB from the middle of up
    to 64 of the largest tensors spread over the part. Hashing every byte of a 16 GB file would take minutes
    on each run; a fine-tune or merge changes nearly every weight, so the sampled bytes differ."""
    part = f.under(prefix)
    h = hashlib.sha256(json.dumps({k: [t.dtype, t.shape] for k, t in sorted(part.items())}).encode())
    big = sorted(part.items(), key=lambda kv: (-(kv[1].end - kv[1].start), kv[0]))
    step = max(1, len(big) // _SAMPLED_TENSORS)
    with f.path.open("rb") as fh:
        for _name, t in big[::step][:_SAMPLED_TENSORS]:
            size = min(_SAMPLE_BYTES, t.end - t.start)
            fh.seek(t.start + (t.end - t.start - size) // 2)
            h.update(fh.read(size))
    return h.hexdigest()[:16]


# ---- what a file holds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """The SD3 architecture read off a single file's tensor shapes."""

    num_layers: int
    hidden: int
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...]
    qk_norm: bool

    @property
    def arch(self) -> str | None:
        if self.num_layers == 38 and self.hidden == 2432:
            return "sd3.5-large"
        if self.num_layers == 24 and self.hidden == 1536:
            return "sd3.5-medium" if self.dual_attention_layers else "sd3-medium"
        return None

    def describe(self) -> str:
        return self.arch or f"an SD3 transformer with {self.num_layers} blocks of width {self.hidden}"


def transformer_prefix(f: SafetensorsFile) -> str | None:
    for p in TRANSFORMER_PREFIXES:
        if f"{p}joint_blocks.0.x_block.attn.qkv.weight" in f.tensors:
            return p
    return None


def transformer_shape(f: SafetensorsFile, prefix: str) -> TransformerShape:
    part = f.under(prefix)
    blocks = {int(m.group(1)) for k in part if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    dual = tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in part))
    pos = part.get("pos_embed")
    return TransformerShape(
        num_layers=max(blocks) + 1,
        hidden=part["context_embedder.weight"].shape[0],
        pos_embed_max_size=int(math.isqrt(pos.shape[1])) if pos is not None else 0,
        dual_attention_layers=dual,
        qk_norm=any(".ln_q." in k for k in part),
    )


def vae_prefix(f: SafetensorsFile) -> str | None:
    for p in VAE_PREFIXES:
        if f"{p}decoder.conv_in.weight" in f.tensors:
            return p
    return None


def encoder_prefix(f: SafetensorsFile, which: str) -> str | None:
    """Where encoder ``which`` sits in this file: bundled under text_encoders.*, or a file of its own."""
    bundled = BUNDLED_ENCODERS[which]
    key = _T5_KEY if which == "t5xxl" else _CLIP_KEY
    if bundled + key in f.tensors:
        return bundled
    hits = [k[: -len(key)] for k in f.tensors if k.endswith(key)]
    return hits[0] if len(hits) == 1 and not hits[0].startswith("text_encoders.") else None


def not_sd3(f: SafetensorsFile, flag: str) -> UserError:
    sample = ", ".join(list(f.tensors)[:2]) or "no tensors"
    return UserError(
        f"{flag} {f.path} is not an SD3 checkpoint (no joint_blocks; keys like {sample}); pass an SD3 / SD3.5 "
        "single file or diffusers folder"
    )


@dataclass
class ModelFiles:
    """Where each part of the model comes from: (file, prefix) per part; identity per part."""

    main: SafetensorsFile
    shape: TransformerShape
    parts: dict[str, tuple[SafetensorsFile, str]]  # transformer, vae, clip_l, clip_g, t5xxl

    def identities(self) -> dict[str, str]:
        out = {}
        for part, (f, prefix) in self.parts.items():
            out[ENCODER_FOLDERS.get(part, part)] = tensor_identity(f, prefix)
        return out


def inspect_files(path: Path, encoder_files: dict[str, str | None]) -> ModelFiles:
    """Reads the headers of the main file and the separate encoder files; one-line errors for anything that is
    not SD3, a missing VAE or CLIP, or an encoder file that is not the encoder its flag names."""
    main = read_header(path, "--pretrained_model_name_or_path")
    tp = transformer_prefix(main)
    if tp is None:
        raise not_sd3(main, "--pretrained_model_name_or_path")
    vp = vae_prefix(main)
    if vp is None:
        raise UserError(
            f"{path} holds the SD3 transformer but no VAE (first_stage_model.*); pass a single file that includes "
            "the VAE (Stability's sd3*/sd3.5*.safetensors do)"
        )
    parts: dict[str, tuple[SafetensorsFile, str]] = {"transformer": (main, tp), "vae": (main, vp)}
    for which in ("clip_l", "clip_g", "t5xxl"):
        given = encoder_files.get(which)
        if given:
            f = read_header(Path(given).expanduser(), f"--{which}")
            prefix = encoder_prefix(f, which)
            if prefix is None:
                kind, key = ("a T5 encoder", _T5_KEY) if which == "t5xxl" else ("a CLIP text encoder", _CLIP_KEY)
                raise UserError(f"--{which} {given} is not {kind} file (no {key})")
            parts[which] = (f, prefix)
        elif encoder_prefix(main, which) == BUNDLED_ENCODERS[which]:
            parts[which] = (main, BUNDLED_ENCODERS[which])
    for which in ("clip_l", "clip_g"):
        if which not in parts:
            raise UserError(
                f"{path} has no {which.upper().replace('_', '-')} text encoder; pass its file with --{which} "
                f"(e.g. ComfyUI's {which}.safetensors)"
            )
    return ModelFiles(main, transformer_shape(main, tp), parts)


def resolve_config_source(config: str | None, shape: TransformerShape) -> Path:
    """The folder with configs and tokenizers for a single file: ``config`` (a folder or hub id), else Stability's
    repo of the detected architecture, fetched without weights (HF cache first)."""
    if config and Path(config).expanduser().is_dir():
        return Path(config).expanduser()
    repo = config or CONFIG_REPOS.get(shape.arch or "")
    if repo is None:
        raise UserError(
            f"the single file holds {shape.describe()}, not a known Stability model; pass --single_file_config "
            "with a diffusers folder or hub id whose configs and tokenizers fit it"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*"]
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, gated or missing all mean the same to the user
        raise UserError(
            f"single-file models need the configs and tokenizers of {repo} ({type(e).__name__}); accept its licence "
            "and log in (huggingface-cli login) once online, or pass --single_file_config DIR (a diffusers SD3 "
            "folder; weights not needed)"
        ) from None
