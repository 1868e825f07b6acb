"""Pure functions fitting ``calibration.json`` from raw bench results (no torch, no GPU).

* :func:`fit_calibration` <- ``bench --parts calibrate`` (stage peaks, training-step options, copy rate);
* :func:`fit_compiled` <- ``bench --parts speed`` (eager vs compiled steps, batch 1 and 4);
* :func:`fit_pipeline_decode` <- ``bench --parts budgets`` (whole runs' validation peaks);
* :func:`fit_process_host` <- whole runs sampled from outside (GPU process memory, host RSS per stage);
* :func:`refit`: all in turn, from the stored results named in ``calibration-sources.json``; the packaged
  calibration is exactly ``refit(bench/results)`` (a test checks it).

Refit: ``sd3booth bench --refit bench/results`` (writes the packaged calibration.json, or
``--calibration_out PATH``), or ``python -m sd3booth.bench.fit bench/results [--out PATH] [--check]``.
Units and meaning of each key: ``docs/calibration.md`` (``sd3booth.plan.calibration.SCHEMA``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from sd3booth.plan.budget import STAGING_BYTES, swapped_host_gib
from sd3booth.plan.calibration import arrange, dumps, flat_keys, packaged_calibration_path, template
from sd3booth.plan.sizes import ModelSizes

GIB = 2**30
SOURCES = "calibration-sources.json"  # in a results folder: which stored run feeds each part of the fit
OPTION_FIELDS = ("base", "checkpoint_blocks", "swap_blocks", "activation_offload", "resolution")


def _units(res: int, hidden: int) -> float:
    """GiB per byte/unit of a calibration step at ``res`` px: image patches + 154 text tokens, batch 1."""
    return ((res // 16) ** 2 + 154) * hidden / GIB


def _start(fallback: dict[str, Any] | None) -> dict[str, Any]:
    cal = template() if fallback is None else copy.deepcopy(fallback)
    cal.setdefault("coefficients", {}).setdefault("base_extra", {})
    cal.setdefault("bytes_per_param", {})
    cal.setdefault("time", {}).setdefault("base_factor", {})
    return cal


def _fit_activations(cal: dict[str, Any], train: dict[tuple, dict], sz: dict[str, Any]) -> float | None:
    """act_full and fixed from no checkpointing at 1024 and 512 px; act_checkpointed from all checkpointed;
    act_inference from the sampling forward. Returns ``fixed`` unrounded, as the stage fits use it."""
    c, n, u = cal["coefficients"], sz["n_blocks"], _units(1024, sz["hidden"])
    lo, hi = train.get(("bf16", 0, 0, False, 512)), train.get(("bf16", 0, 0, False, 1024))
    full = train.get(("bf16", n, 0, False, 1024))
    fixed = c.get("fixed")
    if lo and hi:
        a1024, a512 = hi["peak_gib"] - hi["weights_gib"], lo["peak_gib"] - lo["weights_gib"]
        act_full = (a1024 - a512) / ((u - _units(512, sz["hidden"])) * n)
        fixed = max(0.05, a1024 - act_full * u * n)
        c.update(fixed=round(fixed, 4), act_full=round(act_full, 3))
        if "inference_b2_act_gib" in hi:
            c["act_inference"] = round(hi["inference_b2_act_gib"] / (2 * u), 3)
    if full and fixed is not None and "act_full" in c:
        act = full["peak_gib"] - full["weights_gib"] - fixed - c["act_full"] * u
        c["act_checkpointed"] = round(max(0.0, act / (u * n)), 3)
    return fixed


def _fit_stages(cal: dict[str, Any], stages: dict[tuple, float], sz: dict[str, Any], fixed: float | None) -> None:
    """Text encoders, T5 modes and the VAE: stage peak less weights (and ``fixed``)."""
    c, bpp = cal["coefficients"], cal["bytes_per_param"]
    vae_w = sz["vae_params"] * 2 / GIB
    if (v := stages.get(("VAE decode", "whole"))) is not None:
        c["vae_decode_per_mpx"] = round(v - vae_w, 3)
    if fixed is None:
        return
    if (v := stages.get(("CLIP-L", "bf16 x8"))) is not None:
        c["clip_l_act_per8"] = round(v - sz["clip_l_params"] * 2 / GIB - fixed, 3)
    if (v := stages.get(("CLIP-G", "bf16 x8"))) is not None:
        c["clip_g_act_per8"] = round(v - sz["clip_g_params"] * 2 / GIB - fixed, 3)
    if (v := stages.get(("T5", "bf16 x8"))) is not None:
        c["t5_act_per8x256"] = round(max(0.0, v - sz["t5_params"] * 2 / GIB - fixed), 3)
    if (v := stages.get(("VAE encode", "whole"))) is not None:
        c["vae_encode_per_mpx"] = round(v - vae_w - fixed, 3)
    if "t5_act_per8x256" not in c:
        return
    for mode in ("int8", "nf4"):
        if (v := stages.get(("T5", f"{mode} x8"))) is not None:
            bpp[f"t5_{mode}"] = round((v - fixed - c["t5_act_per8x256"]) / (sz["t5_params"] / GIB), 3)
    if (v := stages.get(("T5", "stream x8"))) is not None:
        c["t5_stream_base"] = round(max(0.0, v - c["t5_act_per8x256"] - fixed), 3)


def _fit_bases(cal: dict[str, Any], train: dict[tuple, dict], sz: dict[str, Any]) -> None:
    """NF4/fp8 bases (all checkpointed): bytes per parameter, extra buffers and step time against bf16."""
    c, bpp, t, n = cal["coefficients"], cal["bytes_per_param"], cal["time"], sz["n_blocks"]
    c["base_extra_units"] = round(_units(1024, sz["hidden"]), 6)
    full = train.get(("bf16", n, 0, False, 1024))
    for base in ("nf4", "fp8"):
        r = train.get((base, n, 0, False, 1024))
        if r is None:
            continue
        other = sz["other_params"] * 2 / GIB
        bpp[base] = round(max(0.3, (r["weights_gib"] - other) / (sz["block_params"] / GIB * n)), 4)
        if full:
            gc_act = full["peak_gib"] - full["weights_gib"]
            c["base_extra"][base] = round(max(0.0, r["peak_gib"] - r["weights_gib"] - gc_act), 3)
            t["base_factor"][base] = round(r["s_per_step"] / full["s_per_step"], 3)


def _fit_times(cal: dict[str, Any], train: dict[tuple, dict], sz: dict[str, Any], h2d: float | None) -> None:
    """The reference step and the time ratios of checkpointing, swap and activation offload."""
    t, n = cal["time"], sz["n_blocks"]
    if h2d is not None:
        t["h2d_gbps"] = h2d
    full, hi = train.get(("bf16", n, 0, False, 1024)), train.get(("bf16", 0, 0, False, 1024))
    if not full:
        return
    t["s_per_step_1024_bf16_full_ckpt"] = full["s_per_step"]
    t["calibration_blocks"] = n
    if hi:
        t["checkpoint_overhead"] = round(full["s_per_step"] / hi["s_per_step"] - 1, 3)
    if (swap := train.get(("bf16", n, n, False, 1024))) and "h2d_gbps" in t:
        copy_s = 2 * n * sz["block_params"] * 2 / (t["h2d_gbps"] * 1e9)
        t["swap_overhead_per_block"] = round(max(0.0, swap["s_per_step"] - max(full["s_per_step"], copy_s)) / n, 5)
    if off := train.get(("bf16", n, 0, True, 1024)):
        t["activation_offload_factor"] = round(off["s_per_step"] / full["s_per_step"], 3)


def fit_calibration(measured: dict[str, Any], fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``calibrate`` keys from one calibrate run (see plan.predict.predict for the formula they enter).

    Without ``fallback`` the result holds the constants and what was measured, nothing else. With it, a key
    whose measurements are missing or failed (a row with ``error``) keeps the fallback's value, so one option
    that could not run on this GPU never costs the rest of the run's measurements (``run_bench`` passes the
    packaged calibration). ``fallback`` is not modified.
    """
    sz = measured["sizes"]
    train = {tuple(r[k] for k in OPTION_FIELDS): r for r in measured["train"] if "error" not in r}
    ok = [r for r in measured["stages"] if "error" not in r and "peak_gib" in r]
    stages = {(r["stage"], r["option"]): r["peak_gib"] for r in ok}
    cal = _start(fallback)
    fixed = _fit_activations(cal, train, sz)
    _fit_stages(cal, stages, sz, fixed)
    _fit_bases(cal, train, sz)
    _fit_times(cal, train, sz, measured.get("h2d_gbps"))
    cal["source"] = (
        f"fitted by sd3booth bench --parts calibrate on {measured.get('device', '?')}, {measured.get('date', '?')}"
    )
    return arrange(cal, strict=False)


def fit_compiled(cal: dict[str, Any], speed: dict[str, Any], hidden: int, n_blocks: int, tokens: int) -> dict[str, Any]:
    """The planner's terms for compiled blocks, from the batch-1 rows of ``bench_speed`` (ours, eager vs
    compiled, without and with full checkpointing): step-time ratios, and the activation coefficients implied
    by the peak each compiled stack saves over its eager twin (same weights, LoRA and optimiser); and the
    batch-4 scaling. Returns a new dict (``cal`` unchanged when rows are missing)."""
    cal = copy.deepcopy(cal)
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


def fit_pipeline_decode(
    cal: dict[str, Any], rows: list[dict[str, Any]], sizes: dict[str, ModelSizes], where: str
) -> dict[str, Any]:
    """``pipeline_decode_extra_per_mpx``: what decoding inside the pipeline costs beyond a bare vae.decode,
    learned from whole runs (``bench --parts budgets``). For each successful run with whole-image VAE work,
    the planner's validation peak is recomputed with ``cal`` and no extra (from the run's plan, its model's
    ``sizes[arch]`` and the budget workload); the coefficient is the largest excess of the measured
    validation peak, per megapixel (0 at least). ``where``: device and date(s), for ``decode_source``."""
    from sd3booth.bench.budgets import budget_workload
    from sd3booth.plan.choose import PLAN_SETTINGS, Plan, predict

    bare = copy.deepcopy(cal)
    bare["coefficients"]["pipeline_decode_extra_per_mpx"] = 0.0
    extras = []
    for r in rows:
        if r["rc"] != 0 or r["plan"]["vae_tiling"]:
            continue
        measured = [v for k, v in r["stages"].items() if k.startswith("validation") and v is not None]
        if not measured:
            continue
        plan = Plan(**{k: v for k, v in r["plan"].items() if k in PLAN_SETTINGS})
        sz = sizes[r["arch"]]
        predicted = predict(plan, sz, budget_workload(r, sz), bare).predicted["validation"]
        extras.append((max(measured) - predicted) / (r["resolution"] ** 2 / 1024**2))
    if not extras:
        return copy.deepcopy(cal)
    out = copy.deepcopy(cal)
    out["coefficients"]["pipeline_decode_extra_per_mpx"] = round(max(0.0, max(extras)), 3)
    out["decode_source"] = f"fitted by sd3booth bench --parts budgets on {where}"
    return arrange(out, strict=False)


def speed_model_terms(run: dict[str, Any]) -> tuple[int, int, int]:
    """(hidden, n_blocks, tokens) of a speed result; results written before they were recorded take them
    from the random model's architecture (the speed part runs at the model's native size)."""
    sp = run["speed"]
    if all(k in sp for k in ("hidden", "n_blocks", "tokens")):
        return sp["hidden"], sp["n_blocks"], sp["tokens"]
    from sd3booth.random_model import get_arch

    tr = get_arch(run["arch"]).transformer
    tokens = (tr["sample_size"] * 8 // 16) ** 2 + 2 * 77  # image patches + CLIP and T5 tokens of the inputs
    return tr["num_attention_heads"] * tr["attention_head_dim"], tr["num_layers"], tokens


PROCESS_KEYS = ("runtime_overhead_gib", "compiled_extra_gib")
HOST_KEYS = (
    "process_gib",
    "cuda_libs_gib",
    "pinned_overhead_per_gib",
    "compile_worker_gib",
    "compile_workers",
    "t5_act_per_token_gib",
    "training_extra_gib",
)
FIRST_HOST_STAGE = "text encoder CLIP-G"  # the first stage the planner predicts: process, libraries, staging buffer


def compiled_cold(row: dict[str, Any]) -> bool:
    """Whether a run's first step compiled its blocks (inductor's compile workers busy) rather than loading them
    from the persistent compile cache: the row's ``compiled_cold``, else its compile-cache counts (any FX graph
    compiled), else True (a first run)."""
    if "compiled_cold" in row:
        return bool(row["compiled_cold"])
    counts = row.get("compile_cache")
    return counts["fxgraph_cache_miss"] > 0 if counts else True


def _fit_process(rows: list[dict[str, Any]]) -> dict[str, float]:
    """GPU memory outside the allocator: NVML peak less the allocator's reserved peak; the median over eager
    runs is the runtime's (else the least of the compiled ones), compiled runs add ``compiled_extra_gib``."""
    rows = [r for r in rows if r.get("process_gpu_gib") and r.get("peak_reserved_gib")]
    outside = [(r["process_gpu_gib"] - r["peak_reserved_gib"], bool(r["plan"].get("compiled"))) for r in rows]
    eager = [v for v, c in outside if not c]
    compiled = [v for v, c in outside if c]
    if not compiled:
        raise ValueError("no compiled run among the process rows: compiled_extra_gib is not measured")
    runtime = statistics.median(eager) if eager else min(compiled)
    extra = max(0.0, statistics.median(compiled) - runtime)
    return {"runtime_overhead_gib": round(runtime, 3), "compiled_extra_gib": round(extra, 3)}


def _fit_host(rows: list[dict[str, Any]], stated: dict[str, Any], cal: dict[str, Any]) -> dict[str, Any]:
    """``host.*``: ``cuda_libs_gib`` from the first predicted stage (its median RSS less ``process_gib`` and the
    staging buffer); then, by least squares over the training stages of bf16-base runs (whose loading never
    outgrows what training holds), training RSS - process - libraries - pinned packs =
    ``training_extra_gib`` + ``pinned_overhead_per_gib`` x pinned GiB + ``compile_worker_gib`` x workers (runs
    whose first step compiled). A term whose column does not vary over the rows keeps its stated value."""
    import numpy as np

    h = dict(stated)
    first = [
        r["stages_host_rss"][FIRST_HOST_STAGE] for r in rows if (r.get("stages_host_rss") or {}).get(FIRST_HOST_STAGE)
    ]
    if first:
        h["cuda_libs_gib"] = round(statistics.median(first) - h["process_gib"] - STAGING_BYTES / GIB, 3)
    train = [r for r in rows if (r.get("stages_host_rss") or {}).get("training") and r["plan"]["base"] == "bf16"]
    if not train:
        return h
    plans = [r["plan"] for r in train]
    pinned = np.array([swapped_host_gib(p["swap_blocks"], p["base"], p.get("swap_dtype", "bf16"),
                                        ModelSizes(**r["sizes"]), cal) for p, r in zip(plans, train)])  # fmt: skip
    busy = np.array([h["compile_workers"] * float(bool(r["plan"].get("compiled")) and compiled_cold(r)) for r in train])
    y = np.array([r["stages_host_rss"]["training"] for r in train]) - h["process_gib"] - h["cuda_libs_gib"] - pinned
    terms = {"training_extra_gib": np.ones_like(y), "pinned_overhead_per_gib": pinned, "compile_worker_gib": busy}
    fitted = [k for k, col in terms.items() if k == "training_extra_gib" or np.ptp(col) > 0]
    for k in (k for k in terms if k not in fitted):
        y = y - terms[k] * h[k]
    coef = np.linalg.lstsq(np.stack([terms[k] for k in fitted], axis=1), y, rcond=None)[0]
    h.update({k: round(float(v), 4 if k == "pinned_overhead_per_gib" else 3) for k, v in zip(fitted, coef)})
    return h


def fit_process_host(cal: dict[str, Any], run: dict[str, Any], name: str) -> dict[str, Any]:
    """``process.*`` and ``host.*`` from whole ``sd3booth train`` runs that measured the whole process (NVML
    process memory and host RSS per stage, sampled from outside): ``run["rows"]``, each with its plan and model
    ``sizes``; ``run["host_constants"]`` states the host terms the rows cannot tell apart (``process_gib``,
    ``compile_workers``, ``t5_act_per_token_gib``) and the starting value of the others."""
    out = copy.deepcopy(cal)
    rows = [r for r in run["rows"] if r.get("rc") == 0]
    stated = {"pinned_overhead_per_gib": 0.0, **run["host_constants"]}
    where = f"fitted from whole runs ({name}) on {run['device']}, {run['date']}"
    out["process"] = {**_fit_process(rows), "source": where}
    h = _fit_host(rows, stated, cal)
    out["host"] = {**{k: h[k] for k in HOST_KEYS}, "source": where}
    return out


def _with_where(part: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    return {**part, "device": run["device"], "date": run["date"]}


def refit(results: Path) -> dict[str, Any]:
    """The calibration fitted from the stored results in ``results`` only (the runs named in its
    ``calibration-sources.json``): calibrate, then speed, then budgets. Every key must come out."""
    results = Path(results)
    sources = json.loads((results / SOURCES).read_text(encoding="utf-8"))

    def read(name: str) -> dict[str, Any]:
        return json.loads((results / name).read_text(encoding="utf-8"))

    cal_run, speed_run = read(sources["calibrate"]), read(sources["speed"])
    cal = fit_calibration(_with_where(cal_run["calibrate"], cal_run))
    cal = fit_compiled(cal, _with_where(speed_run["speed"], speed_run), *speed_model_terms(speed_run))
    cal = fit_process_host(cal, read(sources["process"]), sources["process"])  # the planner's host terms
    sizes = {cal_run["arch"]: ModelSizes(**cal_run["calibrate"]["sizes"])}
    rows, where = [], []
    for name in sources["budgets"]:
        run = read(name)
        if "sizes" in run:  # recorded since the bench package; earlier runs share the calibrate run's model
            sizes[run["arch"]] = ModelSizes(**run["sizes"])
        rows += run["budgets"]
        where.append(f"{run['device']}, {run['date']}")
    cal = fit_pipeline_decode(cal, rows, sizes, "; ".join(dict.fromkeys(where)))
    return arrange(cal)


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    def leaves(cal: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for path in flat_keys(cal):
            v: Any = cal
            for p in path.split("."):
                v = v[p]
            out[path] = v
        return out

    a, b = leaves(old), leaves(new)
    return [f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in dict.fromkeys([*b, *a]) if a.get(k) != b.get(k)]


def refit_command(results: Path, out: Path | None = None, check: bool = False) -> int:
    """Refits from ``results`` and writes ``out`` (the packaged calibration.json by default); with ``check``
    writes nothing and fails (1) if ``out`` differs from the refit. Prints the keys that change."""
    out = Path(out) if out else packaged_calibration_path()
    text = dumps(refit(Path(results)))
    old = out.read_text(encoding="utf-8") if out.is_file() else None
    changes = _changes(json.loads(old), json.loads(text)) if old else ["(new file)"]
    for line in changes if old != text else []:
        print(line)
    if check:
        print(f"{out}: {'matches' if old == text else 'differs from'} the refit from {results}")
        return 0 if old == text else 1
    if old != text:
        out.write_text(text, encoding="utf-8")
    print(f"{out}: {'rewritten' if old != text else 'unchanged'} (refit from {results})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd3booth.bench.fit", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="Folder of stored bench results with calibration-sources.json.")
    p.add_argument("--out", type=Path, help="Calibration file to write. [default: the packaged one]")
    p.add_argument("--check", action="store_true", help="Write nothing; exit 1 if OUT differs from the refit.")
    ns = p.parse_args(argv)
    return refit_command(ns.results, ns.out, ns.check)


if __name__ == "__main__":
    sys.exit(main())
