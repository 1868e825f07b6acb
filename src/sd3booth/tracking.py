"""What a run reports: per-stage peak memory and time, metrics.jsonl, and the progress bar."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sd3booth.cache.store import atomic_write_bytes


class Stages:
    """Peak GPU memory (allocated and reserved) and wall time of each named stage of a run.

    Stages may nest (validation inside training): the inner one resets the peak counters, so the outer
    one's peak is carried across it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[dict[str, Any]] = []
        self._open: list[list[float]] = []  # per open stage: [peak allocated, peak reserved] seen so far

    def _peaks(self) -> list[float]:
        return [
            torch.cuda.max_memory_allocated(self.device) / 2**30,
            torch.cuda.max_memory_reserved(self.device) / 2**30,
        ]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            if self._open:
                self._open[-1] = [max(a, b) for a, b in zip(self._open[-1], self._peaks())]
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open.append([0.0, 0.0])
        t0 = time.perf_counter()
        try:
            yield
        finally:
            carried = self._open.pop()
            rec: dict[str, Any] = {"stage": name, "seconds": round(time.perf_counter() - t0, 3)}
            if cuda:
                torch.cuda.synchronize(self.device)
                alloc, reserved = (max(a, b) for a, b in zip(carried, self._peaks()))
                rec["peak_allocated_gib"] = round(alloc, 3)
                rec["peak_reserved_gib"] = round(reserved, 3)
                rec["allocated_after_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 3)
                if self._open:  # the outer stage's peak includes this one
                    self._open[-1] = [max(a, b) for a, b in zip(self._open[-1], (alloc, reserved))]
            self.records.append(rec)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.records, indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        lines = [f"{'stage':<28} {'seconds':>8} {'peak alloc GiB':>15} {'peak reserved GiB':>18}"]
        for r in self.records:
            lines.append(
                f"{r['stage']:<28} {r['seconds']:>8.2f} {r.get('peak_allocated_gib', 0):>15.2f} "
                f"{r.get('peak_reserved_gib', 0):>18.2f}"
            )
        return "\n".join(lines)


def _step(line: str) -> int | None:
    """The step of one metrics line; None for a line torn by a killed run (or not a record)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


class MetricsFile:
    """Appends one JSON object per logged step to metrics.jsonl (kept across a resume)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists():  # drop lines from beyond the resume point, so the file tells one story
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            keep = [ln for ln in lines if (step := _step(ln)) is not None and step <= resume_step]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode("utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in values.items()}
