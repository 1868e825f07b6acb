"""Block swapping: frozen base weights of some transformer blocks live in pinned CPU memory.

Why our own: diffusers' group offloading points parameters back at a CPU snapshot and silently drops LoRA
updates in training (sd3-facts §5); accelerate's hooks move every parameter, LoRA included. Here only the
frozen ``nn.Linear`` weights and biases of the chosen blocks move (LoRA weights and small norm weights stay
on the device), copied in on a side CUDA stream one block ahead of use, in the order the blocks run: forward
0..N-1, then, with gradient checkpointing, the backward recompute N-1..0.

Correctness never depends on the prefetch guess: a block whose weights were not prefetched is fetched
synchronously (counted in ``stats``). Autograd keeps the weight views it saved alive until it is done with
them, so releasing a block after its forward is safe; with gradient checkpointing nothing of a block is
saved in the forward, which is what makes the memory saving real (the planner only swaps with it on).
PyTorch's non-reentrant checkpoint stops a recompute as soon as it has what backward needs, so a block's
forward hook may never fire there: a block is therefore also released when the next one starts.

Device memory for the copies is a fixed ring of buffers (two per dtype, each as large as the largest block's
weights), allocated once and reused: allocating a fresh tensor per fetch on the side stream made the caching
allocator's reserve grow to twice the live tensors (issue #10, SD3.5 Large at 6 GiB: 10.9 GiB reserved for
5.3 allocated). Before a copy overwrites a buffer, the side stream waits for an event recorded on the compute
stream when the buffer's previous block was released, so no kernel still reading it is overtaken.

Host memory is one exact-size page-locked buffer per block and dtype (``models.host_packs``, ``models.pinned``;
PyTorch's pinned allocator rounds each up to a power of two), filled by the loader straight from the weight
file when it can (no full host copy of the model), and optionally fp8 rows upcast on the GPU after the copy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sd3booth.models.host_packs import BlockPack, Flat, Slot, land, pack_params


@dataclass
class SwapStats:
    prefetched: int = 0  # blocks whose weights were ready (or in flight) when the block ran
    synchronous: int = 0  # blocks fetched on demand (a wrong guess, or the first block)
    bytes_copied: int = 0
    calls: list[int] = field(default_factory=list)  # block indices in call order (tests read it)


@dataclass
class _Buffer:
    """One ring entry: a device tensor per host dtype (in the device dtype), and the compute-stream event after
    which it is free."""

    tensors: dict[torch.dtype, torch.Tensor]
    free_after: torch.cuda.Event | None = None


RING = 2  # buffers: the block running and the one being copied in


class BlockSwapper:
    """Streams the frozen Linear weights of ``swapped`` blocks between pinned host memory and ``device``.

    ``packs`` (block -> :class:`BlockPack`) are host packs the loader read straight from the weight file; a block
    without one is packed from its loaded weights (a copy). ``fp8`` packs those as e4m3 rows (see
    :mod:`sd3booth.models.fp8_rows`): the frozen base of the swapped blocks is then quantised.
    """

    def __init__(self, blocks: Sequence[nn.Module], swapped: Iterable[int], device: torch.device | str,
                 record_calls: bool = False, packs: dict[int, BlockPack] | None = None,
                 fp8: bool = False) -> None:  # fmt: skip
        self.blocks = list(blocks)
        self.swapped = sorted(set(swapped))
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots: dict[int, list[Flat]] = {}
        self.ready: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.ring: list[_Buffer] = []  # the fixed device buffers the copies land in (built on first use)
        self.stage: tuple[torch.Tensor, torch.Tensor] | None = None  # device e4m3 bytes and scales (fp8 packs)
        self.owner: dict[int, _Buffer] = {}  # block -> the buffer holding its weights (fetched or resident)
        self.stats = SwapStats()
        self.record_calls = record_calls
        self._last: int | None = None
        self._direction = 1
        self._next: int | None = None
        self.resident: set[int] = set()
        self._handles = []
        self.from_file = 0  # blocks whose packs came from the loader (no copy made here)
        for i in self.swapped:
            self.slots[i] = self._take(i, (packs or {}).get(i), fp8)
            for f in self.slots[i]:
                for s in f.slots:
                    p = getattr(s.module, s.name)
                    p.data = self._placeholder(p)
            block = self.blocks[i]
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
            self._handles.append(block.register_forward_hook(functools.partial(self._after, i)))

    def _take(self, i: int, pack: BlockPack | None, fp8: bool) -> list[Flat]:
        """Block i's packs: the loader's when the model still points where the loader left it, else new ones."""
        if pack is not None:
            if pack.guard is not None:
                pack.guard.remove()
            if all(_points_at(f, s) for f in pack.flats for s in f.slots):
                self.from_file += 1
                return pack.flats
            if any(f.scales is not None for f in pack.flats):
                raise RuntimeError(f"block {i}'s fp8-packed weights were replaced after loading; cannot swap them")
        return pack_params(self.blocks[i], fp8, self.cuda)

    # ---- public -------------------------------------------------------------------------------------------

    def resident_bytes_saved(self) -> int:
        return sum(f.nbytes for flats in self.slots.values() for f in flats)

    def remove(self) -> None:
        """Puts every weight back on the device (upcast, for fp8 packs) and removes the hooks."""
        for h in self._handles:
            h.remove()
        for flats in self.slots.values():
            for f in flats:
                full = torch.empty(f.host.numel(), dtype=f.device_dtype, device=self.device)
                land(f, full, self._stage_for() if self.cuda else None, non_blocking=False)
                self._point(f, full, copy=True)
        self.slots.clear()
        self.resident.clear()
        self.ready.clear()
        self.owner.clear()
        self.ring.clear()

    # ---- mechanics ------------------------------------------------------------------------------------------

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    @staticmethod
    def _point(flat: Flat, buffer: torch.Tensor, copy: bool = False) -> None:
        """Points each weight of ``flat`` at its view of ``buffer`` (its own copy when ``copy``)."""
        for s in flat.slots:
            view = buffer[s.offset : s.offset + s.shape.numel()].view(s.shape)
            getattr(s.module, s.name).data = view.clone() if copy else view

    def _build_ring(self, n: int) -> None:
        sizes: dict[torch.dtype, tuple[torch.dtype, int]] = {}
        for flats in self.slots.values():
            for f in flats:
                sizes[f.host.dtype] = (f.device_dtype, max(sizes.get(f.host.dtype, (None, 0))[1], f.host.numel()))
        while len(self.ring) < n:
            self.ring.append(_Buffer({h: torch.empty(s, dtype=d, device=self.device) for h, (d, s) in sizes.items()}))

    def _stage_for(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One device buffer for the e4m3 bytes and one for the scales of an fp8 pack, shared by every fetch (all
        on the side stream, in order), allocated once; None without fp8 packs."""
        fp8 = [f for flats in self.slots.values() for f in flats if f.scales is not None]
        if self.stage is None and fp8:
            q = torch.empty(max(f.host.numel() for f in fp8), dtype=fp8[0].host.dtype, device=self.device)
            scales = torch.empty(max(f.scales.numel() for f in fp8), dtype=torch.float32, device=self.device)
            self.stage = (q, scales)
        return self.stage

    def _free_buffer(self) -> _Buffer:
        """A ring buffer no block holds; a prefetched block not running yet gives its buffer up if need be."""
        self._build_ring(RING)
        held = {id(b) for b in self.owner.values()}
        for b in self.ring:
            if id(b) not in held:
                return b
        for j in [j for j in self.ready if j not in self.resident]:  # a wrong guess: drop that prefetch
            self.ready.pop(j)
            return self.owner.pop(j)
        self._build_ring(len(self.ring) + 1)  # every buffer is in use by running blocks: one more, once
        return self.ring[-1]

    def _fetch(self, i: int) -> None:
        if i in self.ready:
            return
        flats = self.slots[i]
        buf = self._free_buffer()
        self.owner[i] = buf
        views = [buf.tensors[f.host.dtype][: f.host.numel()] for f in flats]
        if self.cuda:
            assert self.stream is not None
            stage = self._stage_for()
            with torch.cuda.stream(self.stream):
                if buf.free_after is not None:
                    self.stream.wait_event(buf.free_after)  # the buffer's last reader has run on the compute stream
                for v, f in zip(views, flats):
                    land(f, v, stage, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            for v, f in zip(views, flats):
                land(f, v, None, non_blocking=False)
            event = None
        self.stats.bytes_copied += sum(f.nbytes for f in flats)
        self.ready[i] = (views, event)

    def _predict(self, i: int) -> int | None:
        """The next swapped block expected to run after block i."""
        n = len(self.blocks)
        training = torch.is_grad_enabled()
        pos, d = i, self._direction
        for _ in range(2 * n):
            if d == 1 and pos == n - 1:
                d = -1 if training else 1  # checkpoint recompute runs backwards; sampling starts over
                pos = n - 1 if training else 0
            elif d == -1 and pos == 0:
                d, pos = 1, 0  # the next step's forward
            else:
                pos += d
            if pos in self.slots:
                return pos
        return None

    def _before(self, i: int, module: nn.Module, args: tuple) -> None:
        last, n = self._last, len(self.blocks)
        if last is not None:
            if i > last:
                self._direction = 1
            elif i < last:  # backward recompute, or (sampling) the next forward starting over
                self._direction = 1 if i == 0 and not torch.is_grad_enabled() else -1
            else:  # the same block twice: the turn at either end
                self._direction = -1 if i == n - 1 and torch.is_grad_enabled() else 1
        self._last = i
        if self.record_calls:
            self.stats.calls.append(i)
        for j in [j for j in self.resident if j != i]:
            self._release(j)  # the checkpoint recompute stops early and skips forward hooks: release here
        if i in self.resident or i in self.ready:
            self.stats.prefetched += 1
        else:
            self.stats.synchronous += 1
            self._fetch(i)
        if i not in self.resident:
            tensors, event = self.ready.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            for f, t in zip(self.slots[i], tensors):
                self._point(f, t)
            self.resident.add(i)
        self._next = self._predict(i)
        if self._next is not None and self._next != i:
            self._fetch(self._next)

    def _after(self, i: int, module: nn.Module, args: tuple, output: object) -> None:
        if self._next != i:  # at a turn the same block runs again next, so its weights stay
            self._release(i)

    def _release(self, i: int) -> None:
        for f in self.slots[i]:
            for s in f.slots:
                p = getattr(s.module, s.name)
                p.data = self._placeholder(p)
        self.resident.discard(i)
        buf = self.owner.pop(i, None)
        if buf is not None and self.cuda:
            buf.free_after = torch.cuda.Event()
            buf.free_after.record(torch.cuda.current_stream(self.device))  # after every kernel queued so far


def _points_at(flat: Flat, slot: Slot) -> bool:
    """Whether the model's weight is still what the loader left for this slot: a view of its place in a bf16
    pack, or (fp8 packs) the placeholder of its shape and dtype."""
    p = getattr(slot.module, slot.name)
    if p.shape != slot.shape or p.dtype != flat.device_dtype:
        return False
    if flat.scales is not None:
        return p.numel() == 0 or all(st == 0 for st in p.stride())
    same = p.device.type == "cpu" and p.untyped_storage().data_ptr() == flat.host.untyped_storage().data_ptr()
    return same and p.storage_offset() == slot.offset


def selective_checkpointing(checkpointed: Iterable[int], blocks: Sequence[nn.Module]):
    """A ``gradient_checkpointing_func`` for diffusers that recomputes only the given blocks.

    Full checkpointing costs about a third more arithmetic; checkpointing only as many blocks as memory
    requires keeps most of that time (sd3-facts §4).
    """
    chosen = {id(blocks[i]) for i in checkpointed}

    def run(module: nn.Module, *args):
        if id(module) in chosen:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    return run
