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
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SwapStats:
    prefetched: int = 0  # blocks whose weights were ready (or in flight) when the block ran
    synchronous: int = 0  # blocks fetched on demand (a wrong guess, or the first block)
    bytes_copied: int = 0
    calls: list[int] = field(default_factory=list)  # block indices in call order (tests read it)


@dataclass
class _Slot:
    module: nn.Module
    name: str
    offset: int  # into its block's flat buffer of this dtype
    shape: torch.Size


@dataclass
class _Flat:
    """One block's frozen weights of one dtype, packed into a single pinned buffer: one copy per block
    instead of one per tensor (about 28 for an SD3 block), which keeps the host work of a swap small."""

    host: torch.Tensor
    slots: list[_Slot]


@dataclass
class _Buffer:
    """One ring entry: a device tensor per dtype, and the compute-stream event after which it is free."""

    tensors: dict[torch.dtype, torch.Tensor]
    free_after: torch.cuda.Event | None = None


RING = 2  # buffers: the block running and the one being copied in
ALIGN = 64  # elements: every view starts 128-byte aligned (bf16), as compiled kernels assume of their inputs


class BlockSwapper:
    """Streams the frozen Linear weights of ``swapped`` blocks between pinned host memory and ``device``."""

    def __init__(self, blocks: Sequence[nn.Module], swapped: Iterable[int], device: torch.device | str,
                 record_calls: bool = False) -> None:  # fmt: skip
        self.blocks = list(blocks)
        self.swapped = sorted(set(swapped))
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots: dict[int, list[_Flat]] = {}
        self.ready: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.ring: list[_Buffer] = []  # the fixed device buffers the copies land in (built on first use)
        self.owner: dict[int, _Buffer] = {}  # block -> the buffer holding its weights (fetched or resident)
        self.stats = SwapStats()
        self.record_calls = record_calls
        self._last: int | None = None
        self._direction = 1
        self._next: int | None = None
        self.resident: set[int] = set()
        self._handles = []
        for i in self.swapped:
            found: dict[torch.dtype, list[tuple[nn.Module, str, torch.Tensor]]] = {}
            for mod in self.blocks[i].modules():
                if not isinstance(mod, nn.Linear):
                    continue
                for name in ("weight", "bias"):
                    p = getattr(mod, name, None)
                    if p is None or p.requires_grad:
                        continue  # trainable (LoRA) weights stay where the optimizer expects them
                    if type(p) is not nn.Parameter:
                        raise ValueError(f"block swap cannot move {type(p).__name__} weights (quantised base?)")
                    found.setdefault(p.dtype, []).append((mod, name, p))
            self.slots[i] = [self._pack(tensors) for tensors in found.values()]
            for tensors in found.values():
                for _mod, _name, p in tensors:
                    p.data = self._placeholder(p)
            block = self.blocks[i]
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
            self._handles.append(block.register_forward_hook(functools.partial(self._after, i)))

    # ---- public -------------------------------------------------------------------------------------------

    def resident_bytes_saved(self) -> int:
        return sum(f.host.numel() * f.host.element_size() for flats in self.slots.values() for f in flats)

    def remove(self) -> None:
        """Puts every weight back on the device and removes the hooks."""
        for h in self._handles:
            h.remove()
        for flats in self.slots.values():
            for f in flats:
                self._point(f, f.host.to(self.device), copy=True)
        self.slots.clear()
        self.resident.clear()
        self.ready.clear()
        self.owner.clear()
        self.ring.clear()

    # ---- mechanics ------------------------------------------------------------------------------------------

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    def _pack(self, tensors: list[tuple[nn.Module, str, torch.Tensor]]) -> _Flat:
        slots, offset = [], 0
        for mod, name, p in tensors:
            slots.append(_Slot(mod, name, offset, p.shape))
            offset += -(-p.numel() // ALIGN) * ALIGN
        host = torch.zeros(offset, dtype=tensors[0][2].dtype, pin_memory=self.cuda)
        for slot, (_mod, _name, p) in zip(slots, tensors):
            host[slot.offset : slot.offset + p.numel()].copy_(p.detach().reshape(-1))
        return _Flat(host, slots)

    @staticmethod
    def _point(flat: _Flat, buffer: torch.Tensor, copy: bool = False) -> None:
        """Points each weight of ``flat`` at its view of ``buffer`` (its own copy when ``copy``)."""
        for s in flat.slots:
            view = buffer[s.offset : s.offset + s.shape.numel()].view(s.shape)
            getattr(s.module, s.name).data = view.clone() if copy else view

    def _build_ring(self, n: int) -> None:
        sizes: dict[torch.dtype, int] = {}
        for flats in self.slots.values():
            for f in flats:
                sizes[f.host.dtype] = max(sizes.get(f.host.dtype, 0), f.host.numel())
        while len(self.ring) < n:
            self.ring.append(_Buffer({d: torch.empty(s, dtype=d, device=self.device) for d, s in sizes.items()}))

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
            with torch.cuda.stream(self.stream):
                if buf.free_after is not None:
                    self.stream.wait_event(buf.free_after)  # the buffer's last reader has run on the compute stream
                for v, f in zip(views, flats):
                    v.copy_(f.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            for v, f in zip(views, flats):
                v.copy_(f.host)
            event = None
        self.stats.bytes_copied += sum(v.numel() * v.element_size() for v in views)
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
