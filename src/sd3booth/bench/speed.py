"""``bench --parts speed`` and ``--parts long``: the training step's speed, ours against the stock stack, in one
process.

Measured on synthetic device-resident inputs (as the stock numbers are), batch 1 and 4, at the model's size:
* the stock stack (:mod:`sd3booth.bench.stock`; checkpointing at batch 1 as in the notes, batch 4 without, to
  compare like with like);
* ours: our loader and LoRA, fused AdamW, cuDNN-first attention, eager and with each block compiled; the
  first compiled step (compilation) is reported apart from the steady s/step;
* FLOPs of one step (``torch.utils.flop_counter``) for the model-FLOP utilisation at batch 4;
* parity: 10 optimiser steps eager and compiled from the same LoRA and inputs, relative error of the LoRA;
* a profile of three steps of each stack: GPU busy fraction, top kernels, host synchronisations;
* (``long``) a whole run of N steps of each stack, compilation included, timed end to end.

The planner's compiled terms are fitted from the rows by :func:`sd3booth.bench.fit.fit_compiled`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.bench.harness import GIB, RANK, native_inputs, our_lora_model, placement_for, reset, sync
from sd3booth.bench.stock import stock_stack

PEAK_TFLOPS = 800.0  # dense bf16 measured on the H100 (sd3-facts §4); the MFU denominator


class _Stack:
    """A transformer with a rank-16 LoRA and its optimiser, ready to step."""

    def __init__(self, model: Any, params: list, opt: Any, attention: Callable[[], Any], compiled: Any = None):
        self.model, self.params, self.opt, self.attention, self.compiled = model, params, opt, attention, compiled

    def step(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.attention(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = self.model(**inp, return_dict=False)[0]
        loss = out.float().square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def lora(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten().float() for p in self.params])


def _stock(model_dir: Path, checkpointing: bool, rank: int) -> _Stack:
    model, params, opt = stock_stack(model_dir, rank, checkpointing)
    return _Stack(model, params, opt, contextlib.nullcontext)


def _ours(model_dir: Path, checkpoint_blocks: int, compile_: bool, rank: int, lr: float = 1e-4) -> _Stack:
    from sd3booth.models import loaders, source, speed

    dev = torch.device("cuda")
    src = source.resolve_model(str(model_dir))
    place = placement_for(dev, checkpoint_blocks=checkpoint_blocks)
    model, params = our_lora_model(src, place, rank)
    loaders.attach_memory_savers(model, place)
    compiled = speed.CompiledBlocks(model.transformer_blocks) if compile_ else None
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    return _Stack(model, params, opt, lambda: speed.attention_context(dev), compiled)


def _timed(stack: _Stack, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """First step (compilation, if any) apart; median of ``steps`` steps after ``warmup``; peak memory."""
    inp = native_inputs(stack.model.config, batch, 0)
    reset()
    t0 = time.perf_counter()
    stack.step(inp)
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        stack.step(inp)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        stack.step(inp)
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": round(first, 3),
        "s_per_step": round(statistics.median(times), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
    }


def _flops(stack: _Stack, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    inp = native_inputs(stack.model.config, batch, 0)
    with FlopCounterMode(display=False) as counter:
        stack.step(inp)
    return float(counter.get_total_flops())


def _profile(stack: _Stack, batch: int, steps: int = 3) -> dict[str, Any]:
    """GPU busy fraction (union of kernel intervals over wall time), top kernels and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    from sd3booth.models.speed import profile_summary

    inp = native_inputs(stack.model.config, batch, 0)
    for _ in range(2):
        stack.step(inp)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            stack.step(inp)
        sync()
        wall = time.perf_counter() - t0
    return profile_summary(prof, wall, steps)


def _parity(model_dir: Path, rank: int, steps: int = 10) -> dict[str, float]:
    """The same 10 steps (same LoRA init, same inputs, lr 1e-4) eager and compiled."""
    finals = {}
    for compile_ in (False, True):
        stack = _ours(model_dir, 0, compile_, rank)
        init = stack.lora()
        for i in range(steps):
            stack.step(native_inputs(stack.model.config, 1, seed=100 + i))
        finals[compile_] = (init, stack.lora())
        del stack
        reset()
    (init, eager), (_, comp) = finals[False], finals[True]
    upd_e, upd_c = eager - init, comp - init
    return {
        "steps": steps,
        "lora_rel_err": round(((comp - eager).norm() / eager.norm()).item(), 6),
        "lora_update_rel_err": round(((upd_c - upd_e).norm() / upd_e.norm()).item(), 5),
    }


def _long_run(stack: _Stack, steps: int) -> float:
    """Wall seconds of ``steps`` steps, from the first (compilation included) to the last; a new input each step."""
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        stack.step(native_inputs(stack.model.config, 1, seed=i))
    sync()
    return round(time.perf_counter() - t0, 2)


def bench_long(model_dir: Path, rank: int, long_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A whole run of ``long_steps`` steps of each stack at batch 1 (stock: checkpointing, as in the notes; ours:
    the default plan, no checkpointing, compiled), timed from the first step, compilation included."""
    import torch._dynamo

    stock = _stock(model_dir, True, rank)
    res = {"steps": long_steps, "stock_s": _long_run(stock, long_steps)}
    del stock
    reset()
    torch._dynamo.reset()
    stack = _ours(model_dir, 0, True, rank)
    res["ours_s"] = _long_run(stack, long_steps)
    log(f"long run {res}")
    return res


def _with_mfu(row: dict[str, Any], flops: float) -> dict[str, Any]:
    row["flops"] = flops
    row["mfu"] = round(flops / row["s_per_step"] / (PEAK_TFLOPS * 1e12), 3)
    return row


def _stock_rows(model_dir: Path, rank: int, result: dict[str, Any], record: Callable[..., dict]) -> None:
    stock = _stock(model_dir, True, rank)
    record("stock", stock, 1, "all")
    result["profile_stock_b1"] = _profile(stock, 1)
    del stock
    reset()
    stock4 = _stock(model_dir, False, rank)
    _with_mfu(record("stock", stock4, 4, "none"), _flops(stock4, 4))
    del stock4
    reset()


def _our_rows(model_dir: Path, rank: int, n: int, result: dict[str, Any], record: Callable[..., dict]) -> None:
    import torch._dynamo

    flops4 = None
    for ckpt, label in ((0, "none"), (n, "all")):
        for compile_ in (False, True):
            torch._dynamo.reset()  # each compiled stack pays its own compilation (the on-disk cache may help)
            stack = _ours(model_dir, ckpt, compile_, rank)
            name = "ours compiled" if compile_ else "ours eager"
            record(name, stack, 1, label)
            if ckpt == 0:
                flops4 = flops4 or _flops(stack, 4)  # eager: the counter sees the model's own operations
                _with_mfu(record(name, stack, 4, label), flops4)
                if compile_:
                    result["profile_ours_b1"] = _profile(stack, 1)
            del stack
            reset()


def bench_speed(model_dir: Path, steps: int, rank: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The speed rows (stock and ours, batch 1 and 4), profiles and parity, with the model terms the compiled
    fit needs (hidden, n_blocks, tokens)."""
    from sd3booth.plan.sizes import read_sizes

    sizes = read_sizes(model_dir)
    rows: list[dict[str, Any]] = []
    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    tokens = (cfg["sample_size"] * 8 // 16) ** 2 + 2 * 77  # image patches + CLIP and T5 tokens of the inputs
    result: dict[str, Any] = {"rows": rows, "peak_tflops": PEAK_TFLOPS, "tokens": tokens, "hidden": sizes.hidden,
                              "n_blocks": sizes.n_blocks}  # fmt: skip

    def record(name: str, stack: _Stack, batch: int, ckpt: str) -> dict[str, Any]:
        row = {"stack": name, "batch": batch, "checkpointing": ckpt, **_timed(stack, batch, steps)}
        rows.append(row)
        log(f"speed {row}")
        return row

    _stock_rows(model_dir, rank or RANK, result, record)
    _our_rows(model_dir, rank or RANK, sizes.n_blocks, result, record)
    result["parity"] = _parity(model_dir, rank or RANK)
    log(f"parity {result['parity']}")
    return result
