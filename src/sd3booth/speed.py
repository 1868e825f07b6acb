"""Step speed without changing the maths: regional compilation of the transformer blocks and the choice of
attention kernel.

Why by hand: diffusers' ``compile_repeated_blocks`` needs a model's ``_repeated_blocks``, which
``SD3Transformer2DModel`` does not set, and compiling the whole model recompiles at every graph break and
compiles 24-38 copies of the same block. Here each block's *forward* is compiled, one code object shared by
every block, so the cost is paid once per block variant (the last block is ``context_pre_only``). Module
hooks stay outside the compiled region, which keeps the block swapper's pre/post hooks (eager stream work)
and checkpointing (the diffusers ``gradient_checkpointing_func`` wraps the block call) working unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

# Tests on the CPU set "aot_eager": dynamo + AOTAutograd without needing a C++ toolchain.
BACKEND_ENV = "SD3BOOTH_COMPILE_BACKEND"


def compile_wanted(setting: bool | None, device: torch.device, base: str, activation_offload: bool) -> bool:
    """``--compile`` as given, or (unset) on where it was measured to help: CUDA with bf16 weights.

    Off by default on the CPU (compile time is never won back in a short CPU run), for NF4/fp8 bases (their
    dequantising hooks sit inside the block and break the graph) and with activation offload (saved-tensor
    hooks are not traceable, each block would fall back to eager after paying the compile).
    """
    if setting is not None:
        return setting
    return device.type == "cuda" and base == "bf16" and not activation_offload


class CompiledBlocks:
    """Compiles the ``forward`` of each block in place; ``eager()`` lends the original forwards back."""

    def __init__(self, blocks: Sequence[nn.Module], mode: str | None = None, backend: str | None = None) -> None:
        import torch._dynamo

        self.blocks = list(blocks)
        self.eager_forwards = [b.forward for b in self.blocks]
        # one code object for all blocks: each variant (train/recompute, last block) is a cache entry
        cfg = torch._dynamo.config
        cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512)
        backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
        self.compiled = [torch.compile(f, backend=backend, mode=mode, dynamic=False) for f in self.eager_forwards]
        self._set(self.compiled)

    def _set(self, forwards: list[Any]) -> None:
        for b, f in zip(self.blocks, forwards):
            b.forward = f

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Runs the blocks uncompiled (validation sampling: new shapes, no grad, used a few times a run)."""
        self._set(self.eager_forwards)
        try:
            yield
        finally:
            self._set(self.compiled)

    def remove(self) -> None:
        self._set(self.eager_forwards)


def attention_backends(device: torch.device, choice: str = "auto") -> list[Any]:
    """SDPA backends in order of preference: measured on an H100 at 4429 tokens, fwd+bwd, cuDNN 1.16 ms,
    flash 1.84, mem-efficient 4.35, math 19 (sd3-facts §4). cuDNN leads on Hopper and newer, flash elsewhere.
    """
    from torch.nn.attention import SDPBackend

    order = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if choice != "auto":
        return [order[choice]]
    if device.type != "cuda":
        return []
    major, _ = torch.cuda.get_device_capability(device)
    names = ["cudnn", "flash", "efficient", "math"] if major >= 9 else ["flash", "efficient", "cudnn", "math"]
    return [order[n] for n in names]


def attention_context(device: torch.device, choice: str = "auto") -> contextlib.AbstractContextManager:
    """A context in which SDPA tries the backends in the preferred order (falls back when one cannot run)."""
    backends = attention_backends(device, choice)
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    if choice != "auto":
        return sdpa_kernel(backends)
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without priorities: restrict to the list, which still allows the fallbacks
        return sdpa_kernel(backends)
