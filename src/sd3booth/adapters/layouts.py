"""LoRA files in the three layouts SD3 users meet, read (with detection) and written.

* ``diffusers`` (what diffusers, sd3booth and the reference script write; ComfyUI reads it too):
  ``transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight`` / ``lora_B``; ``text_encoder(_2).…``.
* ``kohya`` (sd-scripts ``networks/lora_sd3.py``): ``lora_unet_joint_blocks_{i}_x_block_attn_qkv.lora_down.weight``
  / ``lora_up`` / ``alpha`` on Stability's module names with q, k, v fused; ``lora_te1_/te2_/te3_`` encoders.
* ``comfyui`` (ComfyUI's own names, as its LoRA save and extract nodes write): ``diffusion_model.<Stability
  name>.lora_down.weight`` / ``lora_up`` / ``alpha``; ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.…``.

In memory a LoRA is a :data:`Modules` dict: diffusers module name with its component prefix
(``transformer.transformer_blocks.0.attn.to_q``) -> (down ``r x in``, up ``out x r``), with the file's
alpha / rank scale folded into ``up``, in fp32, so ``up @ down`` is exactly the weight change. Fusing q/k/v
stacks the down matrices and places the up matrices block-diagonally; splitting keeps each third's rows and
drops the columns that are zero there, so a round trip returns the same factors. The last block's context
AdaLN and the final AdaLN swap their row halves (sd3-facts §8). Hand-written because no library converts
SD3 LoRAs between these layouts (diffusers reads only its own for SD3).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created
from sd3booth.models.sai_keys import GLOBAL_LINEARS, from_sai, is_swapped, swap_halves, to_sai

FORMATS = ("diffusers", "kohya", "comfyui")
Modules = dict[str, tuple[torch.Tensor, torch.Tensor]]

# component -> (kohya prefix, ComfyUI prefix)
COMPONENTS = {
    "transformer": ("lora_unet_", "diffusion_model."),
    "text_encoder": ("lora_te1_", "text_encoders.clip_l.transformer."),
    "text_encoder_2": ("lora_te2_", "text_encoders.clip_g.transformer."),
    "text_encoder_3": ("lora_te3_", "text_encoders.t5xxl.transformer."),
}
_CLIP = [
    *(f"text_model.encoder.layers.{{i}}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
    "text_model.encoder.layers.{i}.mlp.fc1",
    "text_model.encoder.layers.{i}.mlp.fc2",
    "text_projection",
]
_T5 = [
    *(f"encoder.block.{{i}}.layer.0.SelfAttention.{p}" for p in "qkvo"),
    *(f"encoder.block.{{i}}.layer.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo", "wi")),
]
_SAI = [
    f"joint_blocks.{{i}}.{b}.{m}"
    for b in ("x_block", "context_block")
    for m in ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
] + list(GLOBAL_LINEARS.values())
# the module names each component can hold, as Stability (transformer) or transformers (encoders) name them
TEMPLATES = {"transformer": _SAI, "text_encoder": _CLIP, "text_encoder_2": _CLIP, "text_encoder_3": _T5}


def _pattern(template: str, sep: str) -> re.Pattern[str]:
    return re.compile(re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)"))


_UNDERSCORED = {c: [(_pattern(t, "_"), t) for t in ts] for c, ts in TEMPLATES.items()}
_DOTTED = {c: [_pattern(t, ".") for t in ts] for c, ts in TEMPLATES.items()}


def undot(component: str, name: str) -> str | None:
    """kohya's underscored module name -> the dotted one (kohya replaces every '.' by '_', so the known module
    names decide where the dots were); None if this component has no such module."""
    for pat, template in _UNDERSCORED[component]:
        if m := pat.fullmatch(name):
            return template.replace("{i}", m.group(1)) if m.groups() else template
    return None


@dataclass
class LoraFile:
    path: Path
    format: str
    modules: Modules
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    alphas: list[float] = field(default_factory=list)  # the alpha values the file stores (none: alpha = rank)

    @property
    def ranks(self) -> list[int]:
        return sorted({d.shape[0] for d, _ in self.modules.values()})


# ---- detection -----------------------------------------------------------------------------------------------


def detect_format(keys: list[str]) -> str | None:
    """Which layout the keys are in (every key must agree), or None."""
    tests = {
        "kohya": lambda k: k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")),
        "comfyui": lambda k: k.startswith(("diffusion_model.", "text_encoders.")),
        "diffusers": lambda k: ".lora_A." in k or ".lora_B." in k or k.endswith(".alpha"),
    }
    for name, test in tests.items():
        if keys and all(test(k) for k in keys):
            return name
    return None


def _unknown(path: Path, keys: list[str]) -> UserError:
    if any(k.startswith("lycoris_") for k in keys) or any(k.endswith((".lora_magnitude_vector", ".dora_scale"))
                                                         for k in keys):  # fmt: skip
        return UserError(
            f"{path} is a LoHa/LoKr or DoRA adapter, not a plain LoRA: sd3booth lora tools and --init_lora take "
            "LoRAs (generate --lora applies it as it is)"
        )
    sample = ", ".join(keys[:2]) or "no tensors"
    return UserError(
        f"{path}: not a LoRA layout sd3booth knows (keys like {sample}); expected diffusers "
        "(transformer.….lora_A.weight), kohya (lora_unet_….lora_down.weight) or ComfyUI "
        "(diffusion_model.….lora_down.weight)"
    )


# ---- reading ------------------------------------------------------------------------------------------------


def _pairs(state: dict[str, torch.Tensor], down: str, up: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (down, up, scale) for keys ``module{down}`` / ``module{up}`` / ``module.alpha``."""
    out = {}
    for key, d in state.items():
        if key.endswith(down):
            module = key[: -len(down)]
            if module + up not in state:
                raise UserError(
                    f"LoRA layer {module} has {down.strip('.')} but no {up.strip('.')}; the file is damaged"
                )
            u = state[module + up]
            if d.ndim != 2 or u.ndim != 2:
                raise UserError(f"LoRA layer {module} is not a Linear LoRA (shape {tuple(d.shape)}); not supported")
            alpha = state.get(module + ".alpha")
            scale = float(alpha) / d.shape[0] if alpha is not None else 1.0
            out[module] = (d.float(), u.float(), scale)
    return out


def _peft_scales(metadata: dict[str, str]) -> dict[str, tuple[float, bool, dict]]:
    """component -> (lora_alpha, use_rslora, alpha_pattern) from diffusers' ``lora_adapter_metadata``."""
    raw = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    out = {}
    for comp in COMPONENTS:
        if f"{comp}.lora_alpha" in raw:
            out[comp] = (float(raw[f"{comp}.lora_alpha"]), bool(raw.get(f"{comp}.use_rslora")),
                         raw.get(f"{comp}.alpha_pattern") or {})  # fmt: skip
    return out


def _from_diffusers(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[Modules, list[str]]:
    modules: Modules = {}
    unknown = []
    peft = _peft_scales(metadata)
    for name, (d, u, scale) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
        name = name.removeprefix("base_model.model.")
        comp = name.split(".", 1)[0]
        if comp not in COMPONENTS:
            comp, name = "transformer", f"transformer.{name}"
        inner = name.split(".", 1)[1]
        if comp in peft and name + ".alpha" not in state:
            alpha, rslora, pattern = peft[comp]
            alpha = next((float(a) for k, a in pattern.items() if inner == k or inner.endswith("." + k)), alpha)
            scale = alpha / (d.shape[0] ** 0.5 if rslora else d.shape[0])
        ok = to_sai(inner) is not None if comp == "transformer" else any(p.fullmatch(inner) for p in _DOTTED[comp])
        if not ok:
            unknown.append(name)
        modules[name] = (d, u * scale)
    return modules, unknown


def _split_sai(comp_module: str, d: torch.Tensor, u: torch.Tensor) -> Modules:
    """A Stability-named transformer LoRA -> diffusers modules (split qkv, unswap AdaLN rows)."""
    targets = from_sai(comp_module)
    if len(targets) == 1:
        swap = is_swapped(comp_module, u.shape[0], d.shape[1])
        return {f"transformer.{targets[0]}": (d, swap_halves(u) if swap else u)}
    out = {}
    for name, part in zip(targets, u.chunk(len(targets), dim=0)):
        keep = part.abs().sum(dim=0) > 0  # columns that act on this third (block-diagonal after fusing)
        if keep.any():
            out[f"transformer.{name}"] = (d[keep], part[:, keep])
    return out


def _from_stability(state: dict[str, torch.Tensor], kohya: bool) -> tuple[Modules, list[str]]:
    modules: Modules = {}
    unknown = []
    for key, (d, u, scale) in _pairs(state, ".lora_down.weight", ".lora_up.weight").items():
        comp = next((c for c, prefixes in COMPONENTS.items() if key.startswith(prefixes[0 if kohya else 1])), None)
        inner = key[len(COMPONENTS[comp][0 if kohya else 1]) :] if comp else key
        dotted = (undot(comp, inner) if kohya else inner) if comp else None
        if comp is None or dotted is None or not any(p.fullmatch(dotted) for p in _DOTTED[comp]):
            unknown.append(key)
            continue
        if comp == "transformer":
            modules.update(_split_sai(dotted, d, u * scale))
        else:
            modules[f"{comp}.{dotted}"] = (d, u * scale)
    return modules, unknown


def open_state(path: str | Path, flag: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of an adapter file; one-line errors for a missing file, a folder or a damaged
    or non-safetensors file."""
    from safetensors import safe_open

    from sd3booth.models.files import damage

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(
            f"{flag} {p} is a folder; pass the .safetensors file in it, e.g. {p / 'pytorch_lora_weights.safetensors'}"
        )
    if not p.is_file():
        raise UserError(f"{flag} {p} does not exist; pass a LoRA .safetensors file")
    reason = damage(p)
    if reason:
        raise UserError(f"{flag} {p} is damaged or not a safetensors file ({reason}); pass a whole LoRA file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 - no __iter__
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same to the user
        raise UserError(f"{flag} {p} is not a readable safetensors file ({type(e).__name__})") from None


def read_lora(path: str | Path, flag: str = "LoRA") -> LoraFile:
    """Any of the three layouts, detected; one-line errors for a missing file, a folder, an unknown layout or
    layers that belong to no SD3 module (a LoRA of another model)."""
    p = Path(path).expanduser()
    state, metadata = open_state(p, flag)
    keys = sorted(state)
    fmt = detect_format(keys)
    if fmt is None:
        raise _unknown(p, keys)
    if fmt == "diffusers":
        modules, unknown = _from_diffusers(state, metadata)
    else:
        modules, unknown = _from_stability(state, kohya=fmt == "kohya")
    if unknown or not modules:
        what = f"{len(unknown)} of its layers match" if modules else "its layers match"
        raise UserError(
            f"{flag} {p} is a {fmt} LoRA but {what} no SD3 module (e.g. {(unknown or keys)[0]}); is it a LoRA "
            "for another model?"
        )
    dtype = next(iter(state.values())).dtype
    alphas = sorted({float(v) for k, v in state.items() if k.endswith(".alpha")})
    alphas = alphas or sorted({a for a, _r, _p in _peft_scales(metadata).values()})
    return LoraFile(p, fmt, modules, metadata, dtype, alphas)


# ---- writing ------------------------------------------------------------------------------------------------


def _fuse(parts: list[tuple[int, torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v LoRAs -> one LoRA of the fused Linear: stacked downs, block-diagonal ups (exact)."""
    out = parts[0][2].shape[0]
    down = torch.cat([d for _, d, _ in parts], dim=0)
    up = torch.zeros(out * n, down.shape[0], dtype=down.dtype)
    col = 0
    for index, d, u in parts:
        up[index * out : (index + 1) * out, col : col + d.shape[0]] = u
        col += d.shape[0]
    return down, up


def to_stability(modules: Modules) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Modules -> {Stability-side name (component prefix + dotted module): (component, down, up)}."""
    out: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    fused: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for name, (d, u) in modules.items():
        comp, inner = name.split(".", 1)
        if comp != "transformer":
            out[name] = (comp, d, u)
            continue
        sai = to_sai(inner)
        if sai is None:
            raise UserError(f"LoRA layer {name} has no kohya/ComfyUI name; keep this LoRA in diffusers format")
        if sai.part is None:
            out[f"transformer.{sai.module}"] = (
                "transformer",
                d,
                swap_halves(u) if is_swapped(sai.module, u.shape[0], d.shape[1]) else u,
            )
        else:
            fused.setdefault(sai.module, []).append((sai.part, d, u))
    for module, parts in fused.items():
        down, up = _fuse(sorted(parts, key=lambda p: p[0]), 3)
        out[f"transformer.{module}"] = ("transformer", down, up)
    return out


def to_state_dict(modules: Modules, fmt: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a file in ``fmt``; alpha (where the layout has one) equals the rank, the scale being folded."""
    if fmt == "diffusers":
        out = {}
        for name, (d, u) in modules.items():
            out[f"{name}.lora_A.weight"] = d.to(dtype).contiguous()
            out[f"{name}.lora_B.weight"] = u.to(dtype).contiguous()
        return out
    if fmt not in FORMATS:
        raise UserError(f"LoRA format {fmt!r} is not one of {', '.join(FORMATS)}")
    kohya = fmt == "kohya"
    out = {}
    for name, (comp, d, u) in to_stability(modules).items():
        inner = name.split(".", 1)[1]
        key = COMPONENTS[comp][0] + inner.replace(".", "_") if kohya else COMPONENTS[comp][1] + inner
        out[f"{key}.lora_down.weight"] = d.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = u.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(d.shape[0]))
    return out


def delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The weight change of one LoRA layer."""
    return up.float() @ down.float()


def _save_diffusers(modules: Modules, folder: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """diffusers writes the file (its prefixes, its name), with our metadata in the safetensors header."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    layers: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    for key, t in to_state_dict(modules, "diffusers", dtype).items():
        comp, inner = key.split(".", 1)
        layers[comp][inner] = t
    if layers["text_encoder_3"]:
        raise UserError("this LoRA has T5 layers, which diffusers' SD3 loader cannot read; use --to kohya or comfyui")
    name = "pytorch_lora_weights.safetensors"
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=layers["transformer"] or None,
        text_encoder_lora_layers=layers["text_encoder"] or None,
        text_encoder_2_lora_layers=layers["text_encoder_2"] or None,
        weight_name=name,
        save_function=lambda weights, filename: save_file(weights, filename, metadata=metadata),
    )
    return folder / name


def write_lora(
    modules: Modules, path: Path, fmt: str, dtype: torch.dtype, metadata: dict[str, str] | None = None
) -> Path:
    """Writes ``modules`` as a ``fmt`` file at ``path`` (whole, then renamed; readable under the umask)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise UserError(f"LoRA format {fmt!r} is not one of {', '.join(FORMATS)}")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}, "sd3booth.lora_format": fmt}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        if fmt == "diffusers":
            written = _save_diffusers(modules, Path(tmp), dtype, meta)
        else:
            written = Path(tmp) / "lora.safetensors"
            save_file(to_state_dict(modules, fmt, dtype), written, metadata=meta)
        as_if_created(written)
        os.replace(written, path)
    return path
