"""What a run reports: per-stage peak memory (GPU and host) and time, metrics.jsonl, and the progress bar."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_HOST_STATUS = Path("/proc/self/status")
_HOST_CLEAR = Path("/proc/self/clear_refs")


def reset_host_peak() -> bool:
    """Starts a new host-memory peak: on Linux writing 5 to /proc/self/clear_refs sets the process's peak
    resident size (VmHWM) back to its current size. False where that is not possible (then no per-stage
    host peak is recorded: the lifetime peak would be mistaken for the stage's)."""
    try:
        _HOST_CLEAR.write_text("5")
    except OSError:
        return False
    return True


def host_peak_gib() -> float | None:
    """Peak resident memory of this process (GiB) since the last :func:`reset_host_peak`, None off Linux."""
    try:
        for line in _HOST_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class Stages:
    """Peak GPU memory (allocated and reserved), peak host memory (resident) and wall time of each named stage.

    Stages may nest (validation inside training): the inner one resets the peak counters, so the outer
    one's peak is carried across it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[dict[str, Any]] = []
        self._open: list[list[float]] = []  # per open stage: [peak allocated, peak reserved, peak host] so far
        self._host = False  # whether the host peak can be reset per stage

    def _peaks(self) -> list[float]:
        host = (host_peak_gib() or 0.0) if self._host else 0.0
        if self.device.type != "cuda":
            return [0.0, 0.0, host]
        return [
            torch.cuda.max_memory_allocated(self.device) / 2**30,
            torch.cuda.max_memory_reserved(self.device) / 2**30,
            host,
        ]

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._open:
            self._open[-1] = [max(a, b) for a, b in zip(self._open[-1], self._peaks())]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._host = reset_host_peak()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        self._reset()
        self._open.append([0.0, 0.0, 0.0])
        t0 = time.perf_counter()
        try:
            yield
        finally:
            carried = self._open.pop()
            rec: dict[str, Any] = {"stage": name, "seconds": round(time.perf_counter() - t0, 3)}
            if cuda:
                torch.cuda.synchronize(self.device)
            alloc, reserved, host = (max(a, b) for a, b in zip(carried, self._peaks()))
            if cuda:
                rec["peak_allocated_gib"] = round(alloc, 3)
                rec["peak_reserved_gib"] = round(reserved, 3)
                rec["allocated_after_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 3)
            if self._host:
                rec["peak_host_gib"] = round(host, 3)
            if self._open:  # the outer stage's peak includes this one
                self._open[-1] = [max(a, b) for a, b in zip(self._open[-1], (alloc, reserved, host))]
            self.records.append(rec)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.records, indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        lines = [f"{'stage':<28} {'seconds':>8} {'peak alloc GiB':>15} {'peak reserved GiB':>18} {'host GiB':>9}"]
        for r in self.records:
            lines.append(
                f"{r['stage']:<28} {r['seconds']:>8.2f} {r.get('peak_allocated_gib', 0):>15.2f} "
                f"{r.get('peak_reserved_gib', 0):>18.2f} {r.get('peak_host_gib', 0):>9.2f}"
            )
        return "\n".join(lines)


class MetricsFile:
    """Appends one JSON object per logged step to metrics.jsonl (kept across a resume)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists():  # drop lines from beyond the resume point, so the file tells one story
            keep = [
                ln
                for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in values.items()}
