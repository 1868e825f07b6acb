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
    """Peak memory and wall time of each named stage of a run: allocated and reserved by PyTorch's allocator,
    the whole process on the GPU (NVML, as nvidia-smi shows it) and the host resident set (sampled).

    Stages may nest (validation inside training): the inner one resets the peak counters, so the outer
    one's peak is carried across it.
    """

    KEYS = ("peak_allocated_gib", "peak_reserved_gib", "peak_process_gpu_gib", "peak_host_rss_gib")

    def __init__(self, device: torch.device, sample_memory: bool = True) -> None:
        from sd3booth.models.memory import MemorySampler

        self.device = device
        self.records: list[dict[str, Any]] = []
        self.names: list[str] = []  # the stages open now, outermost first
        self.failed_in: str | None = None  # the innermost stage an exception left (an OOM names it)
        self._open: list[tuple[list[float], dict]] = []  # per open stage: the peaks of KEYS so far, host RSS parts
        self.sampler = MemorySampler(device) if sample_memory else None

    def _peaks_and_reset(self) -> tuple[list[float], dict[str, float]]:
        """The peaks of KEYS since the last call, and the host RSS parts (anon/file/shmem) at the host peak."""
        cuda = self.device.type == "cuda"
        out = [0.0, 0.0]
        if cuda:
            torch.cuda.synchronize(self.device)
            out = [
                torch.cuda.max_memory_allocated(self.device) / 2**30,
                torch.cuda.max_memory_reserved(self.device) / 2**30,
            ]
            torch.cuda.reset_peak_memory_stats(self.device)
        gpu, host, parts = self.sampler.reset() if self.sampler else (0.0, 0.0, {})
        return [*out, gpu, host], parts

    @staticmethod
    def _merge(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> tuple[list[float], dict]:
        """Peaks of two intervals: the larger of each; the parts of the one whose host peak was larger."""
        parts = b[1] if b[0][3] >= a[0][3] else a[1]
        return [max(x, y) for x, y in zip(a[0], b[0])], parts

    @property
    def current(self) -> str | None:
        return self.names[-1] if self.names else None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peaks = self._peaks_and_reset()
        if self._open:
            self._open[-1] = self._merge(self._open[-1], peaks)
        self._open.append(([0.0] * len(self.KEYS), {}))
        self.names.append(name)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or name
            raise
        finally:
            carried = self._merge(self._open.pop(), self._peaks_and_reset())
            self.names.pop()
            rec: dict[str, Any] = {"stage": name, "seconds": round(time.perf_counter() - t0, 3)}
            for key, value in zip(self.KEYS, carried[0]):
                if value or key == "peak_host_rss_gib":
                    rec[key] = round(value, 3)
            if carried[1]:  # what the host peak was made of (anon: heap and pinned buffers; file: mapped files)
                rec["peak_host_rss_parts_gib"] = carried[1]
            if self.device.type == "cuda":
                rec["allocated_after_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 3)
            if self._open:  # the outer stage's peak includes this one
                self._open[-1] = self._merge(self._open[-1], carried)
            self.records.append(rec)

    def close(self) -> None:
        if self.sampler:
            self.sampler.close()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.records, indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        lines = [f"{'stage':<28} {'seconds':>8} {'alloc GiB':>10} {'reserved':>9} {'GPU (smi)':>10} {'host RSS':>9}"]
        for r in self.records:
            lines.append(
                f"{r['stage']:<28} {r['seconds']:>8.2f} {r.get('peak_allocated_gib', 0):>10.2f} "
                f"{r.get('peak_reserved_gib', 0):>9.2f} {r.get('peak_process_gpu_gib', 0):>10.2f} "
                f"{r.get('peak_host_rss_gib', 0):>9.2f}"
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
