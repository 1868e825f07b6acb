"""Host memory of an exact size, page-locked for asynchronous copies to the GPU.

Why not ``torch.empty(..., pin_memory=True)``: PyTorch's CachingHostAllocator rounds every pinned allocation
up to the next power of two (``c10::llvm::PowerOf2Ceil`` in ATen/core/CachingHostAllocator.h, unless
``pinned_max_round_threshold`` is set in PYTORCH_CUDA_ALLOC_CONF; it is unlimited by default) and keeps freed
blocks cached: a 426 MB SD3.5 Large block cost 512 MiB, 32 of them 16 GiB for 12.7 GiB of weights (issue #10).
Here each region is an anonymous page-aligned mapping of exactly the bytes asked for, registered with
``cudaHostRegister`` as PyTorch's own checkpoint stager does (torch.cuda._pin_memory_utils), unregistered just
before the mapping is unmapped (when the last tensor viewing it is freed), and nothing is cached.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import torch

from sd3booth.errors import UserError

_lock = threading.Lock()
_registered = {"bytes": 0, "regions": 0}  # page-locked now (tests and the bench read it)


def registered_bytes() -> int:
    """Bytes page-locked by :func:`host_buffer` and not yet released."""
    return _registered["bytes"]


def _unregister(ptr: int, nbytes: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already; the mapping goes anyway
        pass
    with _lock:
        _registered["bytes"] -= nbytes
        _registered["regions"] -= 1


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 CPU tensor of exactly ``nbytes`` (page-aligned, zero-filled on first touch), page-locked when
    ``pin`` (a CUDA run). Views of it keep it alive; the registration ends when the last one is freed."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no anonymous private mappings (and no pinning here)
        return torch.zeros(nbytes, dtype=torch.uint8)
    # private (counted as the process's anon memory; Python's default for -1 is a shared, shmem-backed mapping)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0))
    region = mmap.mmap(-1, max(1, nbytes), flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    tensor = torch.frombuffer(region, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
    if pin and nbytes:
        ptr = tensor.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if err != 0:  # e.g. a locked-memory limit (ulimit -l) or too little RAM: a user's problem, one line
            raise UserError(
                f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory for swapped blocks (cudaHostRegister: "
                f"cudaError {err}); free host memory, lower --max_ram or pass --swap_dtype fp8 to halve the copies"
            )
        with _lock:
            _registered["bytes"] += nbytes
            _registered["regions"] += 1
        # the mapping dies when the last buffer export (the tensor's storage) is released; its weakref callbacks
        # run before the memory is unmapped, so the pages are unregistered while still mapped
        weakref.finalize(region, _unregister, ptr, nbytes)
    return tensor


def host_tensor(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements of ``dtype`` in a region of its exact size (see :func:`host_buffer`)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return host_buffer(numel * size, pin).view(dtype)
