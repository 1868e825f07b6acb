"""Several adapter files on one pipeline for ``sd3booth generate``, each with its weight.

LoRAs in any of the three layouts (``adapters.layouts``) become diffusers adapters of their own, mixed by
``set_adapters``; DoRA files go to diffusers as they are, a LoHa/LoKr file through LyCORIS (``adapters.apply``).
Every layer is checked against the transformer (name and shape) before loading and the adapters are counted
after, so a file that fits nothing is an error, never a silent no-op (diffusers only logs). The CLIP parts are
summed exactly (weighted) into one LoRA per encoder for the caller, which encodes the prompts with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sd3booth.adapters import apply, layouts, tools
from sd3booth.adapters.formats import LYCORIS_PREFIX
from sd3booth.adapters.text_encoder import NAMES
from sd3booth.errors import UserError


def _check_fits(linears: dict[str, torch.nn.Linear], path: Path, layers: layouts.Modules) -> None:
    bad = [
        k for k, (d, u) in layers.items()
        if k.removeprefix("transformer.") not in linears
        or tuple(linears[k.removeprefix("transformer.")].weight.shape) != (u.shape[0], d.shape[1])
    ]  # fmt: skip
    if bad or not layers:
        raise UserError(
            f"--lora {path}: {len(bad)} of its {len(layers)} transformer layers do not fit this model "
            f"(e.g. {(bad or ['none'])[0]}); is it a LoRA for another SD3 model?"
        )


def _load(pipe: Any, path: Path, state: dict[str, torch.Tensor], name: str, expected: int) -> int:
    pipe.load_lora_weights(state, adapter_name=name)
    found = sum(1 for _n, m in pipe.transformer.named_modules() if name in (getattr(m, "lora_A", None) or {}))
    if found != expected:
        raise UserError(f"--lora {path}: only {found} of its {expected} layers were applied")
    return found


def _text_modules(text: dict[str, dict[str, torch.Tensor]], path: Path) -> layouts.Modules:
    """A file's CLIP parts (peft names under their encoder) as Modules."""
    out: layouts.Modules = {}
    for enc, state in text.items():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                out[f"{enc}.{key[: -len('.lora_A.weight')]}"] = (
                    a.float(),
                    state[key.replace("lora_A", "lora_B")].float(),
                )
            elif not key.endswith(".lora_B.weight"):
                raise UserError(f"--lora {path}: its text-encoder part is not a plain LoRA ({key}); it cannot be mixed")
    return out


def text_lora(parts: list[tuple[layouts.Modules, float]]) -> dict[str, dict[str, torch.Tensor]]:
    """The weighted sum of every file's CLIP layers, one single-rank LoRA per encoder (zero-padded: exact)."""
    merged, _report = tools.merge(parts)
    rank = max(d.shape[0] for d, _u in merged.values())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, (d, u) in merged.items():
        enc, module = name.split(".", 1)
        pad = rank - d.shape[0]
        out.setdefault(enc, {})[f"{module}.lora_A.weight"] = torch.cat([d, torch.zeros(pad, d.shape[1])])
        out[enc][f"{module}.lora_B.weight"] = torch.cat([u, torch.zeros(u.shape[0], pad)], dim=1)
    return out


def apply_loras(pipe: Any, specs: list[tuple[Path, float]], log: Any = print) -> tuple[int, dict[str, Any]]:
    """Loads each (file, weight); returns (transformer layers applied, CLIP LoRAs by encoder for the prompts)."""
    names, weights, applied, text_parts = [], [], 0, []
    lycoris = False
    # the Linear layers before any adapter wraps them (peft replaces each adapted one by its own module)
    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for i, (path, weight) in enumerate(specs):
        state, _meta = layouts.open_state(path, "--lora")
        transformer, text = apply.split_state(state)
        if any(k.startswith(LYCORIS_PREFIX) for k in transformer):
            if lycoris:
                raise UserError("generate mixes at most one LoHa/LoKr file (LyCORIS hooks one network)")
            applied += apply.apply_lycoris(pipe.transformer, transformer, str(path), weight)
            lycoris = True
        elif any(k.endswith((".lora_magnitude_vector", ".dora_scale")) for k in transformer):  # DoRA: diffusers
            count = len({k.split(".lora_")[0] for k in transformer if ".lora_A." in k})
            applied += _load(pipe, path, transformer, f"lora{i}", count)
            names.append(f"lora{i}")
            weights.append(weight)
        else:
            lf = layouts.read_lora(path, "--lora")
            layers = {k: v for k, v in lf.modules.items() if k.startswith("transformer.")}
            _check_fits(linears, path, layers)
            applied += _load(pipe, path, layouts.to_state_dict(layers, "diffusers"), f"lora{i}", len(layers))
            names.append(f"lora{i}")
            weights.append(weight)
            t5 = [k for k in lf.modules if k.startswith("text_encoder_3.")]
            if t5:
                log(f"note: {path.name}: {len(t5)} T5 layer(s) not applied (T5 embeddings come from the cache)")
            clip = {k: v for k, v in lf.modules.items() if k.startswith(tuple(f"{n}." for n in NAMES))}
            if clip:
                text_parts.append((clip, weight))
            continue
        if text:
            text_parts.append((_text_modules(text, path), weight))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return applied, text_lora(text_parts) if text_parts else {}
