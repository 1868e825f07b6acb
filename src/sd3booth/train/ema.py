"""Exponential moving average of the adapter weights (``--use_ema``), and the weights a run exports.

Written here rather than taken from diffusers' ``EMAModel``: that class keeps its shadow copy on the parameters'
device and updates it in place against them, so it cannot keep the copy in host memory (``--ema_device cpu``)
while the weights train on the GPU. The decay warm-up is EMAModel's default: min(decay, (1 + t) / (10 + t)).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def ema_decay(step: int, decay: float) -> float:
    """Decay used at optimizer step ``step`` (1-based): short memory at first, so the zero start fades."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """A shadow copy of ``params`` on ``device``, updated after every optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, device: torch.device) -> None:
        self.params, self.decay, self.device = params, decay, device
        self.shadow = [p.detach().to(device, torch.float32, copy=True) for p in params]
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        weight = 1.0 - ema_decay(self.step, self.decay)
        current = [p.detach().to(self.device, torch.float32, non_blocking=False) for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)  # shadow += weight * (param - shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "decay": self.decay, "shadow": [s.cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the adapter {len(self.shadow)}")
        self.step = int(state["step"])
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the EMA weights inside the block, their own bits again after it."""
        with swapped_in(self.params, self.shadow):
            yield


@contextlib.contextmanager
def swapped_in(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Copies ``values`` into ``params`` for the block and restores the exact originals afterwards."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.device, p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextlib.contextmanager
def export_view(optimizer: Any, ema: EMA | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The weights a run validates with and saves: the EMA if there is one; for a schedule-free optimizer the
    averaged iterate it reports in eval mode (its authors require eval() before evaluating or saving). Training
    resumes on the exact bits it had: eval()/train() round trips are not bit-exact, so the bits are restored."""
    schedule_free = hasattr(optimizer, "eval") and hasattr(optimizer, "train")
    if ema is None and not schedule_free:
        yield
        return
    saved = [p.detach().clone() for p in params]
    try:
        if schedule_free:
            optimizer.eval()
        with ema.applied() if ema is not None else contextlib.nullcontext():
            yield
    finally:
        if schedule_free:
            optimizer.train()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
