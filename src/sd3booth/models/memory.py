"""Memory as the user's machine sees it: whole-process GPU memory (NVML), host RSS, and the allocator cap.

``torch.cuda.max_memory_allocated`` counts live tensors only; a card also holds the caching allocator's
reserve, the CUDA context, cuBLAS/cuDNN workspaces and compiled kernels. NVML (the library behind
nvidia-smi) reports what the card gives the process; nvidia-ml-py is read when installed, else nvidia-smi.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import torch

GIB = 2**30


def process_tree_pids(pid: int | None = None) -> list[int]:
    import psutil

    root = psutil.Process(pid or os.getpid())
    return [root.pid, *(c.pid for c in root.children(recursive=True))]


RSS_PARTS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}  # /proc/PID/status: VmRSS is their sum


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts of one process from /proc, kiB ({} where /proc is not there: macOS, Windows)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "VmRSS" or key in RSS_PARTS:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def host_rss_breakdown(pid: int | None = None) -> tuple[float, dict[str, float]]:
    """(resident set of the process and its children, GiB; its parts as the kernel counts them: ``anon``
    (heap, pinned buffers), ``file`` (mapped files, shared libraries: a library mapped by several processes is
    counted in each) and ``shmem``, GiB, summed over the tree; {} where /proc does not split it)."""
    import psutil

    total, parts = 0, dict.fromkeys(RSS_PARTS.values(), 0)
    split = True
    for p in process_tree_pids(pid):
        status = _status_kib(p)
        if "VmRSS" in status and all(k in status for k in RSS_PARTS):
            total += status["VmRSS"] * 1024
            for key, name in RSS_PARTS.items():
                parts[name] += status[key] * 1024
            continue
        split = False
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            pass
    return total / GIB, ({k: round(v / GIB, 3) for k, v in parts.items()} if split else {})


def host_rss_gib(pid: int | None = None) -> float:
    """Resident set of the process and its children, GiB (the headline figure: what top and the issue's targets
    count)."""
    return host_rss_breakdown(pid)[0]


def ram_available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def _nvml_used_by(pids: set[int], index: int) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory]
        return sum(used) / GIB if used else None
    except Exception:  # noqa: BLE001 - no NVML (container, driver): fall back to nvidia-smi
        return None


def _smi_used_by(pids: set[int], index: int) -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return None
    used = [
        float(mib) for pid, mib in (line.split(",") for line in out.splitlines() if "," in line) if int(pid) in pids
    ]
    return sum(used) / 1024 if used else None


def process_gpu_gib(index: int = 0, pid: int | None = None) -> float | None:
    """GPU memory the card gives this process tree (as nvidia-smi shows it), GiB; None when unreadable."""
    pids = set(process_tree_pids(pid))
    used = _nvml_used_by(pids, index)
    return used if used is not None else _smi_used_by(pids, index)


def warm_up_runtime(device: torch.device) -> None:
    """Creates what every run creates before its first step (cuBLAS and cuDNN handles and workspaces, the
    attention kernels' state), so the overhead measured afterwards is the one the run will carry."""
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.half)
    (a @ a).sum().item()
    q = a.view(1, 4, 64, 256)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    torch.cuda.synchronize(device)


def measure_runtime_overhead(device: torch.device) -> float:
    """Whole-process GPU memory outside the caching allocator after warm-up, GiB (0 when NVML is unreadable)."""
    warm_up_runtime(device)
    used = process_gpu_gib(device.index or 0)
    if used is None:
        return 0.0
    return max(0.0, used - torch.cuda.memory_reserved(device) / GIB)


EXPANDABLE = "expandable_segments:True"


def expandable_settings(current: str, env: str | None) -> str | None:
    """The allocator settings that switch expandable segments on, or None to leave them: already on (or off
    on purpose), or the user's own PYTORCH_(CUDA_)ALLOC_CONF asks for something else (e.g. max_split_size_mb,
    which misbehaves beside expandable segments: pytorch/pytorch#123548)."""
    if "expandable_segments" in current:
        return None
    if env and env.strip() != EXPANDABLE:
        return None
    return f"{current},{EXPANDABLE}" if current else EXPANDABLE


def ensure_expandable_segments() -> bool:
    """Expandable segments even where CUDA started before ``sd3booth.configure_environment`` set
    PYTORCH_CUDA_ALLOC_CONF (read once, when the allocator starts): a library caller, or a launcher that
    capped the memory first (tools/gpu_buckets.sh did, so its bucket budgets ran without them). Segments
    created from now on grow and shrink by 2 MiB pages, so what a capped allocator frees serves the next
    bucket's differently sized tensors. The cap still holds: the allocator checks
    set_per_process_memory_fraction before it maps pages (c10/cuda/CUDACachingAllocator.cpp, alloc_block).
    Returns whether it switched them on (False as well where this torch cannot tell)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or put is None or torch.cuda.memory.get_allocator_backend() != "native":
        return False
    env = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    settings = expandable_settings(get(), env)
    if settings is None:
        return False
    put(settings)
    return True


def allocator_settings() -> str:
    """The caching allocator's settings in force (the environment's where this torch cannot say)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return get() if get is not None else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def out_of_memory_record(device: torch.device, error: BaseException) -> dict[str, Any]:
    """What the caching allocator held when an out-of-memory error struck (written to oom.json): live tensors,
    its reserve, the free pieces split off blocks still in use (fragments no other size could take), and
    torch's own message (the request that failed)."""
    stats = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    keys = {
        "allocated_gib": "allocated_bytes.all.current",
        "reserved_gib": "reserved_bytes.all.current",
        "inactive_split_gib": "inactive_split_bytes.all.current",
        "peak_allocated_gib": "allocated_bytes.all.peak",
    }
    out: dict[str, Any] = {k: round(stats.get(v, 0) / GIB, 3) for k, v in keys.items()}
    out["alloc_retries"] = stats.get("num_alloc_retries", 0)
    out["allocator_settings"] = allocator_settings()
    out["message"] = " ".join(str(error).split())[:1000]
    return out


def cap_allocator(device: torch.device, cap_gib: float) -> None:
    """Caps the caching allocator at cap_gib: past it, it frees its cached blocks and retries before failing,
    as it would on a card of that size, instead of growing its reserve."""
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / total), device)


class MemorySampler:
    """Samples whole-process GPU memory and host RSS every ``interval`` seconds in a daemon thread and keeps
    the peaks since the last :meth:`reset` (a stage's peak, as nvidia-smi and top would have shown it)."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        import threading

        self.device, self.interval = device, interval
        self.cuda = device.type == "cuda"
        self.peak_gpu = 0.0
        self.peak_host = 0.0
        self.peak_parts: dict[str, float] = {}  # the host RSS parts at the sample of the host peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sd3booth-memory")
        self._thread.start()

    def _sample(self) -> None:
        host, parts = host_rss_breakdown()
        gpu = (process_gpu_gib(self.device.index or 0) or 0.0) if self.cuda else 0.0
        if host >= self.peak_host:
            self.peak_host, self.peak_parts = host, parts
        self.peak_gpu = max(self.peak_gpu, gpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def reset(self) -> tuple[float, float, dict[str, float]]:
        """(peak GPU GiB, peak host GiB, the host RSS parts at that peak) since the last reset, sampling once more
        first; then starts over."""
        self._sample()
        peaks = (self.peak_gpu, self.peak_host, self.peak_parts)
        self.peak_gpu = self.peak_host = 0.0
        self.peak_parts = {}
        self._sample()
        return peaks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
