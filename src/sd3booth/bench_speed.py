"""``sd3booth bench --parts speed``: the training step's speed, ours against the stock stack, in one process.

Measured on synthetic device-resident inputs (as the stock numbers are), batch 1 and 4, 1024 px:
* the stock stack (diffusers + peft + bitsandbytes AdamW8bit, bf16 autocast, eager, checkpointing at batch 1
  as in the notes; batch 4 without, to compare like with like);
* ours: our loader and LoRA, fused AdamW, cuDNN-first attention, eager and with each block compiled; the
  first compiled step (compilation) is reported apart from the steady s/step;
* FLOPs of one step (``torch.utils.flop_counter``) for the model-FLOP utilisation at batch 4;
* parity: 10 optimiser steps eager and compiled from the same LoRA and inputs, relative error of the LoRA;
* a profile of three steps of each stack: GPU busy fraction, top kernels, host synchronisations;
* (``--parts long``) a whole run of N steps of each stack, compilation included, timed end to end.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.bench import _reset, _sync

GIB = 2**30
PEAK_TFLOPS = 800.0  # dense bf16 measured on the H100 (sd3-facts §4); the MFU denominator


def _inputs(cfg: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic inputs at the model's native size (1024 px for every SD3 model; smaller for ``tiny``)."""
    from sd3booth.bench import _inputs as make

    return make(cfg, cfg["sample_size"] * 8, batch, seed=seed)


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


def _stock(model_dir: Path, batch: int, checkpointing: bool, rank: int) -> _Stack:
    import contextlib

    from sd3booth.bench import stock_stack

    model, params, opt = stock_stack(model_dir, rank, checkpointing)
    return _Stack(model, params, opt, contextlib.nullcontext)


def _ours(model_dir: Path, checkpoint_blocks: int, compile_: bool, rank: int, lr: float = 1e-4) -> _Stack:
    from sd3booth.adapters import lora
    from sd3booth.config import DEFAULT_LORA_LAYERS
    from sd3booth.models import loaders, placement, source, speed

    dev = torch.device("cuda")
    src = source.resolve_model(str(model_dir))
    place = placement.Placement(**{**placement.plan_placement(dev, "bf16", "bf16").__dict__,
                                "checkpoint_blocks": checkpoint_blocks})  # fmt: skip
    torch.manual_seed(0)
    model = loaders.load_transformer(src, place)
    params = lora.add_lora(model, rank, rank, 0.0, lora.resolve_targets(model, list(DEFAULT_LORA_LAYERS), None))
    with torch.no_grad():  # a non-zero B, the same in every stack built here, so parity compares real updates
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.01)
    loaders.attach_memory_savers(model, place)
    compiled = speed.CompiledBlocks(model.transformer_blocks) if compile_ else None
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    return _Stack(model, params, opt, lambda: speed.attention_context(dev), compiled)


def _timed(stack: _Stack, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """First step (compilation, if any) apart; median of ``steps`` steps after ``warmup``; peak memory."""
    inp = _inputs(stack.model.config, batch, 0)
    _reset()
    t0 = time.perf_counter()
    stack.step(inp)
    _sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        stack.step(inp)
    _sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        stack.step(inp)
        _sync()
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": round(first, 3),
        "s_per_step": round(statistics.median(times), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
    }


def _flops(stack: _Stack, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    inp = _inputs(stack.model.config, batch, 0)
    with FlopCounterMode(display=False) as counter:
        stack.step(inp)
    return float(counter.get_total_flops())


def _profile(stack: _Stack, batch: int, steps: int = 3) -> dict[str, Any]:
    """GPU busy fraction (union of kernel intervals over wall time), top kernels and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    inp = _inputs(stack.model.config, batch, 0)
    for _ in range(2):
        stack.step(inp)
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            stack.step(inp)
        _sync()
        wall = time.perf_counter() - t0
    from sd3booth.models.speed import profile_summary

    return profile_summary(prof, wall, steps)


def _parity(model_dir: Path, rank: int, steps: int = 10) -> dict[str, float]:
    """The same 10 steps (same LoRA init, same inputs, lr 1e-4) eager and compiled."""
    finals = {}
    for compile_ in (False, True):
        stack = _ours(model_dir, 0, compile_, rank)
        init = stack.lora()
        for i in range(steps):
            stack.step(_inputs(stack.model.config, 1, seed=100 + i))
        finals[compile_] = (init, stack.lora())
        del stack
        _reset()
    (init, eager), (_, comp) = finals[False], finals[True]
    upd_e, upd_c = eager - init, comp - init
    return {
        "steps": steps,
        "lora_rel_err": round(((comp - eager).norm() / eager.norm()).item(), 6),
        "lora_update_rel_err": round(((upd_c - upd_e).norm() / upd_e.norm()).item(), 5),
    }


def _long_run(stack: _Stack, steps: int) -> float:
    """Wall seconds of ``steps`` steps, from the first (compilation included) to the last; a new input each step."""
    _sync()
    t0 = time.perf_counter()
    for i in range(steps):
        stack.step(_inputs(stack.model.config, 1, seed=i))
    _sync()
    return round(time.perf_counter() - t0, 2)


def bench_long(model_dir: Path, rank: int, long_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A whole run of ``long_steps`` steps of each stack at batch 1 (stock: checkpointing, as in the notes; ours:
    the default plan, no checkpointing, compiled), timed from the first step, compilation included."""
    import torch._dynamo

    stock = _stock(model_dir, 1, True, rank)
    res = {"steps": long_steps, "stock_s": _long_run(stock, long_steps)}
    del stock
    _reset()
    torch._dynamo.reset()
    stack = _ours(model_dir, 0, True, rank)
    res["ours_s"] = _long_run(stack, long_steps)
    log(f"long run {res}")
    return res


def bench_speed(model_dir: Path, steps: int, rank: int, log: Callable[[str], None]) -> dict[str, Any]:
    from sd3booth.plan.sizes import read_sizes

    sizes = read_sizes(model_dir)
    n = sizes.n_blocks
    rows: list[dict[str, Any]] = []
    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    tokens = (cfg["sample_size"] * 8 // 16) ** 2 + 2 * 77  # image patches + CLIP and T5 tokens of _inputs
    result: dict[str, Any] = {"rows": rows, "peak_tflops": PEAK_TFLOPS, "tokens": tokens, "hidden": sizes.hidden,
                              "n_blocks": n}  # fmt: skip

    def record(name: str, stack: _Stack, batch: int, ckpt: str, **extra: Any) -> dict[str, Any]:
        row = {"stack": name, "batch": batch, "checkpointing": ckpt, **_timed(stack, batch, steps), **extra}
        rows.append(row)
        log(f"speed {row}")
        return row

    stock = _stock(model_dir, 1, True, rank)
    record("stock", stock, 1, "all")
    result["profile_stock_b1"] = _profile(stock, 1)
    del stock
    _reset()
    stock4 = _stock(model_dir, 4, False, rank)
    r = record("stock", stock4, 4, "none")
    r["flops"] = _flops(stock4, 4)
    r["mfu"] = round(r["flops"] / r["s_per_step"] / (PEAK_TFLOPS * 1e12), 3)
    del stock4
    _reset()

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
                r = record(name, stack, 4, label, flops=flops4)
                r["mfu"] = round(flops4 / r["s_per_step"] / (PEAK_TFLOPS * 1e12), 3)
                if compile_:
                    result["profile_ours_b1"] = _profile(stack, 1)
            del stack
            _reset()
    result["parity"] = _parity(model_dir, rank)
    log(f"parity {result['parity']}")
    return result


def fit_compiled(cal: dict[str, Any], speed: dict[str, Any], hidden: int, n_blocks: int, tokens: int) -> dict[str, Any]:
    """The planner's terms for compiled blocks, from the batch-1 rows of ``bench_speed`` (ours, eager vs
    compiled, without and with full checkpointing): step-time ratios, and the activation coefficients implied
    by the peak each compiled stack saves over its eager twin (same weights, LoRA and optimiser)."""
    rows = {(r["stack"], r["checkpointing"]): r for r in speed.get("rows", []) if r["batch"] == 1}
    need = [(s, k) for s in ("ours eager", "ours compiled") for k in ("none", "all")]
    if any(key not in rows for key in need):
        return cal
    c, t = cal["coefficients"], cal["time"]
    units = tokens * hidden / GIB
    saved_none = rows["ours eager", "none"]["peak_gib"] - rows["ours compiled", "none"]["peak_gib"]
    saved_all = rows["ours eager", "all"]["peak_gib"] - rows["ours compiled", "all"]["peak_gib"]
    full_drop = saved_none / (units * n_blocks)  # every block saves its full activations
    c["act_full_compiled"] = round(c["act_full"] - full_drop, 3)
    # all checkpointed: each block keeps its inputs, and one block at a time is recomputed in full
    c["act_checkpointed_compiled"] = round(c["act_checkpointed"] - (saved_all / units - full_drop) / n_blocks, 3)
    for k in ("none", "all"):
        ratio = rows["ours compiled", k]["s_per_step"] / rows["ours eager", k]["s_per_step"]
        t[f"compiled_factor_{k}"] = round(ratio, 3)
    # batch 4 against batch 1 (no checkpointing): what share of 4x the tokens shows up as time
    b4 = {r["stack"]: r for r in speed["rows"] if r["batch"] == 4 and r["checkpointing"] == "none"}
    for stack, key in (("ours eager", "launch_bound_fraction"), ("ours compiled", "launch_bound_fraction_compiled")):
        if stack in b4:
            t[key] = round(b4[stack]["s_per_step"] / rows[stack, "none"]["s_per_step"] / 4, 3)
    cal["compiled_source"] = (
        f"fitted by sd3booth bench --parts speed on {speed.get('device', '?')}, {speed.get('date', '?')}"
    )
    return cal


def markdown_speed(res: dict[str, Any]) -> list[str]:
    rows = res.get("rows", [])
    base = {r["batch"]: r["s_per_step"] for r in rows if r["stack"] == "stock"}
    lines = [
        "| stack | batch | checkpointing | s/step | vs stock (same batch) | first step s | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = base[r["batch"]] / r["s_per_step"]
        lines.append(
            f"| {r['stack']} | {r['batch']} | {r['checkpointing']} | {r['s_per_step']:.3f} | {speedup:.2f}× | "
            f"{r['first_step_s']:.1f} | {r['peak_gib']:.2f} | {r.get('mfu', '')} |"
        )
    p = res.get("parity")
    if p:
        lines += ["", f"Parity after {p['steps']} steps, compiled vs eager: LoRA rel. err {p['lora_rel_err']}, "
                  f"rel. err of the update {p['lora_update_rel_err']}."]  # fmt: skip
    if res.get("long_run") and "ours_s" in res["long_run"]:
        lr = res["long_run"]
        lines += ["", f"{lr['steps']}-step run, compilation included: stock {lr['stock_s']} s, ours {lr['ours_s']} s "
                  f"({lr['stock_s'] / lr['ours_s']:.2f}×)."]  # fmt: skip
    for key in ("profile_stock_b1", "profile_ours_b1"):
        if key in res:
            q = res[key]
            top = "; ".join(f"{k['name']} {k['share']:.0%}" for k in q["top_kernels"][:5])
            lines += [
                "",
                f"Profile {key[8:]}: GPU busy {q['gpu_busy_fraction']:.0%} of {q['wall_s_per_step']} s/step, "
                f"{q['kernels_per_step']} kernels/step, {q['host_syncs_per_step']} host syncs/step; top: {top}",
            ]
    return lines + [""]
