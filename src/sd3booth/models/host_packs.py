"""The host side of block swapping: each swapped block's frozen Linear weights packed into one exact-size,
page-locked buffer per host dtype (``models.pinned``), in bf16 (the base's own dtype) or as fp8 rows with
power-of-two scales (``models.fp8_rows``), and how a pack lands in its device buffer.

A pack is built either from a loaded model's weights (:func:`pack_params`, a copy) or by the loader straight
from the weight file (``models.direct``), in which case the weights never exist anywhere else in host memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from sd3booth.models import fp8_rows, pinned

ALIGN = 64  # elements: every view starts 128-byte aligned (bf16), as compiled kernels assume of their inputs


@dataclass
class Slot:
    module: nn.Module
    name: str  # "weight" or "bias"
    offset: int  # into its block's flat buffer of this dtype, elements
    shape: torch.Size
    row: int = -1  # first of its rows in the pack's scales (fp8 packs)


@dataclass
class Flat:
    """One block's frozen weights of one host dtype, packed into a single buffer: one copy per block instead of
    one per tensor (about 28 for an SD3 block), which keeps the host work of a swap small."""

    host: torch.Tensor  # 1-D, host dtype
    slots: list[Slot]
    device_dtype: torch.dtype  # what the weights are on the device (the block computes with)
    scales: torch.Tensor | None = None  # fp8 packs: one fp32 power-of-two scale per row of every weight

    @property
    def nbytes(self) -> int:
        extra = self.scales.numel() * 4 if self.scales is not None else 0
        return self.host.numel() * self.host.element_size() + extra

    def view(self, slot: Slot) -> torch.Tensor:
        return self.host[slot.offset : slot.offset + slot.shape.numel()].view(slot.shape)


@dataclass
class BlockPack:
    """What the loader prepared for one swapped block; ``guard`` stops the block running before the swapper
    takes the pack (its fp8-packed weights are placeholders in the model until then)."""

    flats: list[Flat]
    guard: torch.utils.hooks.RemovableHandle | None = field(default=None, repr=False)


def frozen_linear_params(block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, "weight"/"bias", tensor) of every frozen nn.Linear weight and bias of a block, in module order;
    trainable (LoRA) weights stay where the optimizer expects them."""
    found = []
    for mod in block.modules():
        if not isinstance(mod, nn.Linear):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if p is None or p.requires_grad:
                continue
            if type(p) is not nn.Parameter:
                raise ValueError(f"block swap cannot move {type(p).__name__} weights (quantised base?)")
            found.append((mod, name, p))
    return found


def host_dtype(shape: torch.Size, dtype: torch.dtype, fp8: bool) -> torch.dtype:
    """fp8 packs hold the 2-D weights as e4m3 rows; biases (and everything in bf16 packs) keep their dtype."""
    return fp8_rows.FP8 if fp8 and len(shape) == 2 else dtype


def new_flats(entries: Iterable[tuple[nn.Module, str, torch.Size, torch.dtype]], fp8: bool, pin: bool) -> list[Flat]:
    """Empty packs (one per host dtype) for (module, name, shape, device dtype) entries, laid out and allocated
    at their exact size; the caller fills each :meth:`Flat.view` (and its scales, for fp8)."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple[nn.Module, str, torch.Size]]] = {}
    for mod, name, shape, dtype in entries:
        groups.setdefault((host_dtype(shape, dtype, fp8), dtype), []).append((mod, name, torch.Size(shape)))
    flats = []
    for (hdtype, ddtype), items in groups.items():
        slots, offset, rows = [], 0, 0
        for mod, name, shape in items:
            quantised = hdtype == fp8_rows.FP8 and ddtype != fp8_rows.FP8
            slots.append(Slot(mod, name, offset, shape, rows if quantised else -1))
            offset += -(-shape.numel() // ALIGN) * ALIGN
            rows += shape[0] if quantised else 0
        host = pinned.host_tensor(offset, hdtype, pin)
        scales = pinned.host_tensor(rows, torch.float32, pin) if rows else None
        flats.append(Flat(host, slots, ddtype, scales))
    return flats


def fill_from(flat: Flat, slot: Slot, w: torch.Tensor) -> None:
    """Writes weight ``w`` into its place in the pack (quantised rows for fp8)."""
    if slot.row < 0:
        flat.view(slot).copy_(w.detach())
        return
    assert flat.scales is not None
    s = fp8_rows.row_scales(w)
    flat.scales[slot.row : slot.row + slot.shape[0]].copy_(s)
    flat.view(slot).copy_(fp8_rows.quantize_rows(w, s))


def pack_params(block: nn.Module, fp8: bool, pin: bool) -> list[Flat]:
    """The packs of a loaded block: its frozen Linear weights copied (and quantised for fp8) into new buffers."""
    found = frozen_linear_params(block)
    flats = new_flats(((m, n, p.shape, p.dtype) for m, n, p in found), fp8, pin)
    where = {(id(s.module), s.name): (f, s) for f in flats for s in f.slots}
    for mod, name, p in found:
        flat, slot = where[(id(mod), name)]
        fill_from(flat, slot, p)
    return flats


def land(flat: Flat, out: torch.Tensor, stage: tuple[torch.Tensor, torch.Tensor] | None, non_blocking: bool) -> None:
    """Copies a pack into ``out`` (1-D, the device dtype, on the device). fp8 packs go through ``stage`` (device
    buffers for the e4m3 bytes and the scales; None on the CPU, where the host pack is read directly) and are
    upcast there: per weight a cast-copy and an exact multiply by its power-of-two row scales."""
    if flat.scales is None:
        out[: flat.host.numel()].copy_(flat.host, non_blocking=non_blocking)
        return
    q, scales = flat.host, flat.scales
    if stage is not None:
        q = stage[0][: flat.host.numel()]
        scales = stage[1][: flat.scales.numel()]
        q.copy_(flat.host, non_blocking=non_blocking)
        scales.copy_(flat.scales, non_blocking=non_blocking)
    for s in flat.slots:  # every slot of an fp8 pack is a quantised weight
        n = s.shape.numel()
        dst = out[s.offset : s.offset + n].view(s.shape)
        fp8_rows.dequantize_rows_(dst, q[s.offset : s.offset + n].view(s.shape), scales[s.row : s.row + s.shape[0]])
