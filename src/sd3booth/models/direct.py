"""Models built on the meta device from their config, their weights read into place from the safetensors files
by :mod:`sd3booth.models.reader` (plain reads, no mapping): host memory holds one staging buffer while a model
loads, never its file.

What from_pretrained decides is kept: floating-point weights take the requested dtype except the modules the
library keeps in fp32 (transformers' ``_keep_in_fp32_modules`` for fp16, e.g. T5's ``wo``; diffusers' own list),
other tensors keep the file's dtype; tied weights are tied again (transformers' ``tie_weights``); the model is
in eval mode. As torchtune does after every load, missing and unexpected keys are checked and any is an error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd3booth.errors import UserError
from sd3booth.models.host_packs import BlockPack, new_flats
from sd3booth.models.reader import DTYPES, Reader, open_reader, weight_files

# a name -> the tensor the caller prepared for it (host packs of swapped blocks), or None to read it here
Prepared = Callable[[str], torch.Tensor | None]


def empty_model(cls: Any, folder: Path) -> nn.Module:
    """``cls`` built from the config in ``folder`` with its parameters on the meta device (no memory) and its
    buffers real (as diffusers' own loader builds it, so buffers computed at construction are the same)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):  # diffusers
            model = cls.from_config(cls.load_config(folder))
        else:  # transformers
            model = cls(cls.config_class.from_pretrained(folder))
    if hasattr(model, "register_to_config"):  # as from_pretrained records where the weights came from
        model.register_to_config(_name_or_path=str(folder))
    else:
        model.name_or_path = str(folder)
    return model


def _fp32_rule(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether a weight stays fp32 when the model loads in ``dtype``, by the model's library's own rule."""
    plan = getattr(model, "_get_dtype_plan", None)
    if callable(plan):  # transformers: the patterns of its dtype plan, searched in each name
        patterns = [re.compile(p.replace("*", ".*")) for p, d in plan(dtype).items() if d == torch.float32]
        return lambda name: any(p.search(name) for p in patterns)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []  # diffusers: a module name on the path
    return lambda name: any(m in name.split(".") for m in keep)


def _targets(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every loadable name -> (module, attribute, is a parameter); persistent buffers included."""
    out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(dot + attr, []).append((mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out.setdefault(dot + attr, []).append((mod, attr, False))
    return out


def _ignored(model: nn.Module) -> Callable[[str], bool]:
    """Keys a checkpoint may carry that the library ignores: its ignore lists, and non-persistent buffers
    (older CLIP checkpoints store ``position_ids``)."""
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    buffers = {
        f"{prefix}.{attr}" if prefix else attr
        for prefix, mod in model.named_modules()
        for attr in mod._non_persistent_buffers_set
    }
    return lambda name: name in buffers or any(p.search(name) for p in patterns)


def _set(places: list[tuple[nn.Module, str, bool]], tensor: torch.Tensor) -> None:
    param = None
    for mod, attr, is_param in places:
        if is_param:
            param = param if param is not None else nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            mod._parameters[attr] = param
        else:
            mod._buffers[attr] = tensor


def check_keys(model: nn.Module, unexpected: list[str], where: str) -> None:
    """Raises one line naming the file(s) when a weight was not loaded (still on the meta device) or the file
    holds tensors the model does not have."""
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    missing += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if missing or unexpected:
        show = lambda keys: ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")  # noqa: E731
        parts = [f"{len(missing)} missing ({show(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({show(unexpected)})"] if unexpected else []
        raise UserError(
            f"{where} does not fit {type(model).__name__}: {' and '.join(parts)} weights; is it the right checkpoint?"
        )


def load_weights(model: nn.Module, reader: Reader, dtype: torch.dtype, device: torch.device,
                 prepared: Prepared | None = None) -> nn.Module:  # fmt: skip
    """Reads every weight of the empty ``model`` from ``reader`` onto ``device`` (``prepared`` ones excepted),
    ties tied weights, moves the remaining buffers and checks the keys; returns the model in eval mode."""
    fp32 = _fp32_rule(model, dtype)
    targets = _targets(model)
    ignored = _ignored(model)
    table = reader.table
    unexpected = [k for k in table.names() if k not in targets and not ignored(k)]
    for name, places in targets.items():
        if name not in table:
            continue
        tensor = prepared(name) if prepared else None
        if tensor is None:
            _, t = table.where[name]
            src = DTYPES[t.dtype]
            target = (torch.float32 if fp32(name) else dtype) if src.is_floating_point else src
            tensor = torch.empty(t.shape, dtype=target, device=device)
            reader.read_into(name, tensor)
        _set(places, tensor)
    if hasattr(model, "tie_weights"):  # transformers ties after loading (T5's embed_tokens to shared)
        model.tie_weights()
    for mod in model.modules():
        for attr, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[attr] = b.to(device)
    check_keys(model, unexpected, table.describe())
    return model.eval()


def load_model(cls: Any, folder: Path, variant: str | None, dtype: torch.dtype, device: torch.device) -> Any:
    """``cls.from_pretrained(folder, dtype, device)`` without mapping the weight files; None when the folder has
    no safetensors weights (the caller then uses from_pretrained)."""
    files = weight_files(folder, variant)
    if files is None:
        return None
    model = empty_model(cls, folder)
    with open_reader(files, pin=device.type == "cuda") as reader:
        return load_weights(model, reader, dtype, device)


def _not_swapped_yet(i: int, module: nn.Module, args: tuple) -> None:
    raise RuntimeError(
        f"transformer block {i} holds fp8-packed host weights; attach the block swapper "
        "(models.loaders.attach_memory_savers) before running the model"
    )


def _pack_block(model: nn.Module, i: int, reader: Reader, dtype: torch.dtype, device: torch.device, fp8: bool,
                prepared: dict[str, torch.Tensor]) -> BlockPack:  # fmt: skip
    """Reads block i's Linear weights from the file straight into new exact-size host packs. bf16: the model's
    weights become views of the pack; fp8: placeholders of their shape (a zero-stride view of one element on
    the device), and the block refuses to run until the swapper takes the pack."""
    block = model.transformer_blocks[i]
    entries = [
        (f"transformer_blocks.{i}.{rel}.{attr}", mod, attr, p.shape)
        for rel, mod in block.named_modules()
        if isinstance(mod, nn.Linear)
        for attr, p in mod._parameters.items()
        if p is not None
    ]
    flats = new_flats(((m, a, shape, dtype) for _, m, a, shape in entries), fp8, device.type == "cuda")
    where = {(id(s.module), s.name): (f, s) for f in flats for s in f.slots}
    for name, mod, attr, shape in entries:
        if name not in reader.table:
            continue  # left on the meta device: check_keys reports it
        flat, slot = where[(id(mod), attr)]
        if slot.row < 0:
            reader.read_into(name, flat.view(slot))
            prepared[name] = flat.view(slot)
        else:
            assert flat.scales is not None
            reader.read_fp8_rows(name, flat.view(slot), flat.scales[slot.row : slot.row + shape[0]], device)
            prepared[name] = torch.zeros((), dtype=dtype, device=device).expand(shape)
    guard = block.register_forward_pre_hook(functools.partial(_not_swapped_yet, i)) if fp8 else None
    return BlockPack(flats, guard)


def load_swapped_transformer(cls: Any, folder: Path, variant: str | None, dtype: torch.dtype, device: torch.device,
                             swapped: range, fp8: bool) -> Any:  # fmt: skip
    """The transformer with the frozen Linear weights of the ``swapped`` blocks read from the file straight into
    the block swapper's host packs (``model.swap_packs``; bf16, or fp8 rows when ``fp8``) and every other weight
    straight onto ``device``: no full host copy of the model is ever made. None without safetensors files."""
    files = weight_files(folder, variant)
    if files is None:
        return None
    model = empty_model(cls, folder)
    prepared: dict[str, torch.Tensor] = {}
    with open_reader(files, pin=device.type == "cuda") as reader:
        n = len(model.transformer_blocks)
        packs = {i: _pack_block(model, i, reader, dtype, device, fp8, prepared) for i in swapped if i < n}
        load_weights(model, reader, dtype, device, prepared.get)
    model.swap_packs = packs  # models.loaders.attach_memory_savers hands them to the BlockSwapper
    return model
