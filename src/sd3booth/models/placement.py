"""Where and in which precision each stage runs, decided in one place.

:func:`place_run` is the only way a command (``train``, ``prepare``, ``generate``, the bench's budget runs)
gets a :class:`Placement`: from the device's capabilities (:class:`DeviceInfo`, detected once or injected by
a test), the user's settings and the memory plan. Because the text-cache key carries the T5 mode and the
latent key the VAE tiling and dtype, two commands that decided differently would miss each other's caches;
deciding once makes ``prepare`` then ``train`` reuse every entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sd3booth.errors import UserError
from sd3booth.models.fp8_compute import FP8_MIN_CAPABILITY
from sd3booth.plan.choose import Machine, Plan, plan_for_config

GIB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    """What the run's device can do. :func:`detect_device` reads it from CUDA; tests construct it directly to
    simulate a GPU on a CPU-only machine."""

    type: str = "cpu"  # "cuda" | "cpu"
    index: int = 0
    total_gib: float | None = None  # the card's memory (None on the CPU)
    bf16: bool = False  # bf16 compute supported
    name: str = "cpu"
    available_gib: float | None = None  # free on the card at start, plus what this process already holds
    overhead_gib: float = 0.0  # process memory outside the allocator after warm-up (0: not measured)
    ram_available_gib: float | None = None  # host memory available at start
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability ((0, 0) on the CPU)

    @property
    def device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type == "cuda" else torch.device("cpu")


def detect_device(device: torch.device | None = None) -> DeviceInfo:
    """The first GPU if there is one (or the given device), else the CPU."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    from sd3booth.models import memory

    if device.type != "cuda":
        return DeviceInfo(ram_available_gib=memory.ram_available_gib())
    props = torch.cuda.get_device_properties(device)
    overhead = memory.measure_runtime_overhead(device)
    free, _total = torch.cuda.mem_get_info(device)
    own = memory.process_gpu_gib(device.index or 0) or 0.0
    return DeviceInfo(
        type="cuda",
        index=device.index or 0,
        total_gib=props.total_memory / GIB,
        # emulated bf16 (a T4, V100 or 10-series card) is slow and overflows nothing fp16 would not: fp16 plan
        bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        name=props.name,
        available_gib=free / GIB + own,
        overhead_gib=overhead,
        ram_available_gib=memory.ram_available_gib(),
        capability=torch.cuda.get_device_capability(device),
    )


@dataclass(frozen=True)
class Placement:
    """Devices and dtypes of every stage, plus the memory plan (``plan.predict.Plan``) they follow.

    Memory options live only in ``memory``: a new option is a field of ``Plan`` and nothing here changes.
    """

    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16" (autocast; LoRA params stay fp32)
    weight_dtype: torch.dtype  # compute dtype of the frozen transformer (its storage too when base is bf16)
    text_dtype: torch.dtype  # CLIP encoders
    vae_dtype: torch.dtype
    memory: Plan = Plan()
    budget_gib: float = 0.0  # 0 on the CPU: no budget applies

    @property
    def t5_dtype(self) -> torch.dtype:
        """T5's compute dtype: bf16 on cards that have it; fp16 on those that do not (transformers then keeps
        the FFN output layers in fp32, where T5 overflows fp16); fp32 on a CPU-only fp32 run."""
        if self.t5_device.type == "cpu" and self.weight_dtype == torch.float32:
            return torch.float32
        return torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16

    @property
    def t5_device(self) -> torch.device:
        return torch.device("cpu") if self.memory.t5 == "cpu" else self.device


def default_mixed_precision(info: DeviceInfo) -> str:
    if info.type != "cuda":
        return "no"
    return "bf16" if info.bf16 else "fp16"


def decide(info: DeviceInfo, mixed_precision: str | None, memory: Plan, budget_gib: float = 0.0) -> Placement:
    """Every dtype and device, from the device's capabilities, the precision flag and the memory plan."""
    mp = mixed_precision or default_mixed_precision(info)
    if info.type != "cuda":
        if memory.t5 in ("int8", "nf4") or memory.base == "nf4":
            raise UserError("NF4 and int8 weights need a CUDA GPU (bitsandbytes); use bf16 or cpu on this machine")
        if mp == "fp16":
            raise UserError("--mixed_precision fp16 needs a GPU; use no or bf16 on the CPU")
        if memory.t5 == "stream":
            memory = replace(memory, t5="cpu")  # nothing to stream to
    elif mp == "bf16" and not info.bf16:
        raise UserError(f"--mixed_precision bf16: {info.name} has no bf16 support; use fp16 or leave it unset")
    weight = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # The SD3 VAE overflows in fp16, so it stays fp32 there (as the reference does) and bf16 otherwise.
    vae = torch.float32 if mp in ("no", "fp16") else torch.bfloat16
    return Placement(info.device, mp, weight, weight, vae, memory, budget_gib)


def place_run(
    cfg: Any,
    model_root: Path,
    info: DeviceInfo,
    cal: dict[str, Any] | None = None,
    train_size: tuple[int, int] | None = None,
    shapes: int = 1,
) -> Placement:
    """The placement of a run (a ``TrainConfig``): its memory plan for the device, then every dtype and device.

    ``train``, ``prepare`` and ``generate`` all call this, so they agree on every choice that keys a cache.
    ``train_size`` is the largest training image (w, h) (the largest aspect-ratio bucket; default square) and
    ``shapes`` the number of distinct batch shapes the data gives (``prepare.batch_shape_count``).
    """
    machine = None
    if cfg.base_compute == "fp8" and info.type == "cuda" and info.capability < FP8_MIN_CAPABILITY:
        raise UserError(f"--base_compute fp8 needs fp8 tensor cores (Ada, Hopper or newer); {info.name} has none")
    if info.type == "cuda":
        available = info.available_gib if info.available_gib is not None else info.total_gib
        bf16 = info.bf16 and cfg.mixed_precision != "fp16"
        machine = Machine(available, info.overhead_gib, bf16, info.ram_available_gib)
    memory, budget = plan_for_config(cfg, model_root, machine, cal, train_size, shapes)
    return decide(info, cfg.mixed_precision, memory, budget)
