"""Step speed without changing the maths: regional compilation of the transformer blocks and the choice of
attention kernel.

Why by hand: diffusers' ``compile_repeated_blocks`` needs a model's ``_repeated_blocks``, which
``SD3Transformer2DModel`` does not set, and compiling the whole model recompiles at every graph break and
compiles 24-38 copies of the same block. Here each block's *forward* is compiled, one code object shared by
every block, so the cost is paid once per block variant (the last block is ``context_pre_only``). Module
hooks stay outside the compiled region, which keeps the block swapper's pre/post hooks (eager stream work)
and checkpointing (the diffusers ``gradient_checkpointing_func`` wraps the block call) working unchanged.

Compilation persists across runs (:func:`persistent_compile_cache`): inductor's own on-disk caches in a folder
that outlives the run, so a second run loads what the first compiled instead of compiling it again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd3booth.errors import UserError
from sd3booth.fileio import user_cache_root
from sd3booth.plan.terms import MAX_STATIC_SHAPES  # batch shapes that compile once each, with static shapes

# Tests on the CPU set "aot_eager": dynamo + AOTAutograd without needing a C++ toolchain.
BACKEND_ENV = "SD3BOOTH_COMPILE_BACKEND"
# "static" or "dynamic" forces the shape mode of compiled blocks (tools/gpu_buckets.sh measures both).
SHAPES_ENV = "SD3BOOTH_COMPILE_SHAPES"
ENTRIES_PER_SHAPE = 4  # cache entries one shape can take: block variants (the last block), train/recompute


def dynamic_shapes(n_shapes: int, choice: str | None = None) -> bool:
    """Whether compiled blocks trace with dynamic shapes.

    Static shapes give every bucket the kernels a square run has (the same speed once compiled) and cost one
    compilation (~30 s on an H100, sd3-facts §4) per shape, paid in the first epoch; dynamic shapes compile
    once for all shapes, with kernels that cannot specialise on the token count. A handful of shapes (at most
    ``MAX_STATIC_SHAPES``) compile statically; more switch to dynamic shapes, so compilation stays bounded
    either way and no step recompiles after the first time its shape is seen. ``SD3BOOTH_COMPILE_SHAPES``
    (``static`` / ``dynamic``) overrides the choice.
    """
    choice = choice or os.environ.get(SHAPES_ENV) or "auto"
    if choice not in ("auto", "static", "dynamic"):
        raise UserError(f"{SHAPES_ENV}={choice!r}: expected static, dynamic or auto")
    return choice == "dynamic" or (choice == "auto" and n_shapes > MAX_STATIC_SHAPES)  # as plan.terms.shape_mode


COMPILE_WORKERS = 2  # inductor's compile subprocesses: each holds ~0.4 GiB of host memory while it lives
COMPILE_CACHE_ENV = "SD3BOOTH_COMPILE_CACHE"  # the folder of compiled blocks kept across runs
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where compiled blocks are kept across runs: ``$SD3BOOTH_COMPILE_CACHE``; else the user's own
    ``$TORCHINDUCTOR_CACHE_DIR``; else ``compile`` under sd3booth's cache root (``~/.cache/sd3booth``).

    Not the run's ``--cache_dir`` (OUTPUT_DIR/cache by default): a new output folder would start cold, colder
    than torch's own default (``/tmp/torchinductor_USER``, lost at reboot). torch sets TORCHINDUCTOR_CACHE_DIR
    to that default as soon as dynamo is imported, so the default value does not count as the user's choice.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = os.environ if env is None else env
    if env.get(COMPILE_CACHE_ENV):
        return Path(env[COMPILE_CACHE_ENV]).expanduser()
    user = env.get(INDUCTOR_CACHE_ENV)
    if user and os.path.abspath(user) != os.path.abspath(default_cache_dir()):
        return Path(user)
    return user_cache_root() / "compile"


@contextlib.contextmanager
def persistent_compile_cache(folder: Path | None) -> Iterator[None]:
    """Inductor's on-disk caches in ``folder`` for the block (nothing changes when None).

    One folder holds every cache a compiled block needs on its next first step: the FX graph cache (inductor's
    generated code), the AOTAutograd cache (the traced forward/backward pair), the autotuning results and the
    Triton kernels (``TRITON_CACHE_DIR`` defaults to a subfolder). Both graph caches are on by default and key
    each entry by a hash of torch's source, the GPU's name, the CUDA and Triton versions and the graph with its
    input shapes, dtypes and devices, so another torch or GPU misses instead of loading a wrong entry. Chosen
    over ``torch.compiler.save_cache_artifacts`` ("mega-cache"), which packs the same caches into one blob to
    carry to another machine: here the folder simply stays, and nothing must be saved at the end of a run that
    may be killed. ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` turns the caches off.
    """
    if folder is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    folder.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(folder)):  # sets TORCHINDUCTOR_CACHE_DIR, clears the cached paths, restores
        yield


def compile_cache_counts() -> dict[str, int]:
    """Hits, misses and bypasses of the FX graph and AOTAutograd caches so far in this process (one per
    compiled graph; a warm first step hits them all)."""
    from torch._dynamo.utils import counters

    out = {}
    for group, prefix in (("inductor", "fxgraph_cache_"), ("aot_autograd", "autograd_cache_")):
        for what in ("hit", "miss", "bypass"):
            out[prefix + what] = int(counters[group][prefix + what])
    return out


class CompiledBlocks:
    """Compiles the ``forward`` of each block in place; ``eager()`` lends the original forwards back.

    Inductor compiles in a pool of worker processes, by default one per CPU core, each a Python process with
    torch loaded; on the 16-core GPU machine they added ~7 GiB of host memory for the whole run (issue #10).
    The pool is kept small and :meth:`done_compiling` shuts it down once every block variant is compiled.

    ``shapes`` is the number of distinct batch shapes the run feeds (see :func:`dynamic_shapes`).
    """

    def __init__(
        self, blocks: Sequence[nn.Module], mode: str | None = None, backend: str | None = None, shapes: int = 1
    ) -> None:
        import torch._dynamo
        import torch._inductor.config

        torch._inductor.config.compile_threads = min(COMPILE_WORKERS, torch._inductor.config.compile_threads)

        self.blocks = list(blocks)
        self.eager_forwards = [b.forward for b in self.blocks]
        self.dynamic = dynamic_shapes(shapes)
        self.shapes = shapes
        # one code object for all blocks: each variant (train/recompute, last block) and each static shape is a
        # cache entry; the limits are raised so that no entry is ever evicted or refused (a refused frame would
        # silently run eager)
        cfg = torch._dynamo.config
        entries = ENTRIES_PER_SHAPE * (1 if self.dynamic else shapes)
        cfg.cache_size_limit = max(cfg.cache_size_limit, 64, entries)
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512, 2 * entries)
        backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
        if self.dynamic and mode == "reduce-overhead":
            mode = None  # a graph per shape, each holding its own activations: not worth it past a few shapes
        self.cuda_graphs = mode in ("reduce-overhead", "max-autotune")
        self.compiled = [
            torch.compile(f, backend=backend, mode=mode, dynamic=self.dynamic) for f in self.eager_forwards
        ]
        self._set(self.compiled)

    def _set(self, forwards: list[Any]) -> None:
        for b, f in zip(self.blocks, forwards):
            b.forward = f

    def describe(self) -> str:
        how = ("dynamic" if self.dynamic else "static") + " shapes" + (", CUDA graphs" if self.cuda_graphs else "")
        return (f"compiling {len(self.blocks)} blocks for {self.shapes} batch shape(s), {how} (first steps; cache "
                f"{compile_cache_dir()})")  # fmt: skip

    def step_begin(self) -> None:
        """Marks a new training iteration for CUDA graph trees (their outputs of the last one may be reused)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @staticmethod
    def done_compiling() -> None:
        """Ends inductor's compile worker processes (a later recompile starts them again)."""
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()

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


def profile_summary(prof: Any, wall_s: float, steps: int) -> dict[str, Any]:
    """GPU busy fraction (union of kernel intervals over wall time), top kernels and host syncs per step."""
    kernels, syncs, per_name = [], 0, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            start = e.time_range.start
            kernels.append((start, start + e.time_range.elapsed_us()))
            per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
    kernels.sort()
    busy, end = 0.0, float("-inf")
    for a, b in kernels:
        if b > end:
            busy += b - max(a, end)
            end = b
    total = sum(per_name.values()) or 1.0
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:8]
    cpu = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:10]
    return {
        "steps": steps,
        "wall_s_per_step": round(wall_s / steps, 4),
        "gpu_busy_fraction": round(busy / 1e6 / wall_s, 3) if wall_s else 0.0,
        "kernels_per_step": len(kernels) // max(steps, 1),
        "host_syncs_per_step": round(max(syncs - 1, 0) / max(steps, 1), 2),  # less the one ending the window
        "top_kernels": [{"name": n[:90], "share": round(t / total, 3)} for n, t in top],
        "top_cpu_ops": [
            {
                "name": a.key[:90],
                "self_ms_per_step": round(a.self_cpu_time_total / 1e3 / max(steps, 1), 2),
                "calls_per_step": round(a.count / max(steps, 1), 1),
            }
            for a in cpu
        ],  # fmt: skip
    }


class StepProfiler:
    """``SD3BOOTH_PROFILE=START:COUNT`` profiles training steps START+1..START+COUNT of a real run (CUDA only)
    and writes their summary (``profile_summary``) to ``path``; a no-op otherwise."""

    def __init__(self, spec: str | None, device: torch.device, path: Any, log: Any) -> None:
        self.start = self.count = 0
        if spec:
            first, _, count = spec.partition(":")
            try:
                start, n = int(first), int(count or 3)
            except ValueError:
                start = n = -1
            if start < 0 or n < 1:
                raise UserError(f"SD3BOOTH_PROFILE={spec!r}: expected START:COUNT, e.g. 40:3 (profiles steps 41-43)")
            if device.type == "cuda":
                self.start, self.count = start, n
        self.path, self.log, self.prof, self.t0 = path, log, None, 0.0

    def step(self, done: int) -> None:
        """Called after each optimiser step with the number of steps done."""
        import json
        import time

        if not self.count:
            return
        if done == self.start:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif done == self.start + self.count and self.prof is not None:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            summary = profile_summary(self.prof, wall, self.count)
            self.path.write_text(json.dumps(summary, indent=2) + "\n")
            self.log(f"profile of steps {self.start + 1}-{done}: {summary}")
            self.prof = None
