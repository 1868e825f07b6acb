"""The markdown of a bench result (``bench-ARCH.md``): one table per part that ran. Pure Python."""

from __future__ import annotations

from typing import Any


def _stock(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| stock stack (bf16 + GC + AdamW8bit, eager) | res | weights GiB | peak GiB | s/step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| stock | {r['resolution']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} |"
        )
    return [*lines, ""]


def _calibrate(cal: dict[str, Any]) -> list[str]:
    lines = [
        "| training step option | res | weights GiB | peak GiB | s/step | output rel. err | LoRA grad rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cal["train"]:
        opt = f"{r['base']}, ckpt {r['checkpoint_blocks']}, swap {r['swap_blocks']}" + (
            ", act. offload" if r["activation_offload"] else ""
        )
        if "error" in r:
            lines.append(f"| {opt} | {r['resolution']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {opt} | {r['resolution']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} | "
            f"{r.get('output_rel_err', '')} | {r.get('lora_grad_rel_err', '')} |"
        )
    lines += ["", "| stage | option | peak GiB | seconds | cosine vs bf16 |", "|---|---|---|---|---|"]
    for r in cal["stages"]:
        if "peak_gib" not in r:
            lines.append(f"| {r['stage']} | {r['option']} | failed: {r.get('error', '?')} | | |")
            continue
        lines.append(
            f"| {r['stage']} | {r['option']} | {r['peak_gib']:.2f} | {r.get('seconds', '')} | "
            f"{r.get('cosine_vs_bf16', '')} |"
        )
    return [*lines, "", f"Host-to-device copy (pinned): {cal.get('h2d_gbps', '?')} GB/s", ""]


def _plan(p: dict[str, Any]) -> str:
    return (
        f"{p['base']}, ckpt {p['checkpoint_blocks']}, swap {p['swap_blocks']}"
        + (" (fp8 host copies)" if p.get("swap_dtype") == "fp8" and p["swap_blocks"] else "")
        + f", T5 {p['t5']}"
        + (", act. offload" if p["activation_offload"] else "")
        + (", VAE tiled" if p["vae_tiling"] else "")
        + (", compiled" if p.get("compiled") else "")
    )


def _budgets(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| --max_vram | plan | predicted peak | measured peak (alloc / reserved) | s/step (predicted) "
        "| first step s | per-stage peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['budget_gib'] or 'default'} | failed: {r.get('error', '')} | | | | | |")
            continue
        predicted_s = f" ({r['predicted_s_per_step']:.3f})" if "predicted_s_per_step" in r else ""
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if v is not None)
        lines.append(
            f"| {r['budget_gib'] or 'default'} | {_plan(r['plan'])} | {r['predicted_peak_gib']:.2f} | "
            f"{r['peak_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {r['s_per_step']:.3f}{predicted_s} | "
            f"{r.get('first_step_s', '')} | {stages} |"
        )
    if any("process_gpu_gib" in r for r in rows):
        lines += ["", *_whole_process(rows)]
    return lines


def _gib(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if isinstance(row.get(key), float | int) else "-"


def _whole_process(rows: list[dict[str, Any]]) -> list[str]:
    """What the user's card and computer see (issue #10): NVML process memory and host RSS, sampled from
    outside the run every 100 ms, beside the planner's predictions and the allocator's peak."""
    lines = [
        "| --max_vram | GPU, whole process (nvidia-smi) | predicted | allocator cap | allocated peak "
        "| host RSS | predicted host |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rc"] != 0:
            continue
        cells = [_gib(r, k) for k in ("process_gpu_gib", "predicted_process_gib", "allocator_cap_gib", "peak_gib",
                                      "host_rss_gib", "predicted_host_gib")]  # fmt: skip
        lines.append(f"| {r['budget_gib'] or 'default'} | " + " | ".join(cells) + " |")
    return lines


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, float | int) else "-"


def _speed_row(r: dict[str, Any], base: dict[int, float], process: bool) -> str:
    """One row of the speed table; a whole run (``"measured": "run"``) is not compared with the stock stack,
    which was timed on synthetic inputs in this process."""
    if r.get("s_per_step") is None:
        cells = [r["stack"], str(r["batch"]), r.get("checkpointing", "-"), f"failed: {r.get('error', '?')}"]
        return "| " + " | ".join(cells + [""] * (5 if process else 4)) + " |"
    speedup = base.get(r["batch"]) if r.get("measured") != "run" else None
    cells = [r["stack"], str(r["batch"]), r["checkpointing"], f"{r['s_per_step']:.3f}",
             f"{speedup / r['s_per_step']:.2f}×" if speedup else "-", _num(r.get("first_step_s"), ".1f"),
             _num(r.get("peak_gib"), ".2f"), str(r.get("mfu", ""))]  # fmt: skip
    if process:
        cells.append(_num(r.get("process_gpu_gib"), ".2f"))
    return "| " + " | ".join(cells) + " |"


def _target(value: float | None, key: str) -> str:
    from sd3booth.bench.runs import TARGETS

    if value is None:
        return "- (a run failed)"
    return f"{value:.2f}× (target ≤ {TARGETS[key]:.2f}×: {'met' if value <= TARGETS[key] else 'not met'})"


def _runs(res: dict[str, Any]) -> list[str]:
    """Below the table: the targets' ratios, the whole runs, the cold start, the plans of our runs."""
    lines = []
    if q := res.get("ratios"):
        default = _target(q["default_vs_reference"], "default_vs_reference")
        small = _target(q["small_vs_default"], "small_vs_default")
        lines += ["", f"Ratios: ours default / diffusers script s/step {default}; ours --max_vram 3 / ours default "
                  f"{small}."]  # fmt: skip
    if w := res.get("whole_run"):
        lines += ["", f"{w['steps']}-step run, everything included (loading, caching, compilation, 2 validations): "
                  f"diffusers script {w['reference_s']} s, ours {w['ours_s']} s: "
                  f"{_target(w['whole_vs_reference'], 'whole_vs_reference')}."]  # fmt: skip
    first = [f"{r['stack'].rsplit(', ', 1)[-1]}: {_num(r.get('first_step_s'), '.1f')} s (FX graphs: "
             f"{r['compile_cache']['fxgraph_cache_miss']} compiled, {r['compile_cache']['fxgraph_cache_hit']} loaded)"
             for r in res.get("rows", []) if "compile_cache" in r]  # fmt: skip
    if first:
        lines += ["", "First compiled step after the model is loaded (target ≤ 20 s): " + "; ".join(first) + "."]
    plans = [f"{r['stack']}: {_plan(r['plan'])}" for r in res.get("rows", []) if r.get("plan")]
    if plans:
        lines += ["", "Plans of our runs: " + "; ".join(dict.fromkeys(plans)) + "."]
    return lines


def markdown_speed(res: dict[str, Any]) -> list[str]:
    """The speed part: step table against stock (and the runs beside diffusers' script), parity, the long run
    and the profiles."""
    rows = res.get("rows", [])
    base = {r["batch"]: r["s_per_step"] for r in rows if r["stack"] == "stock"}
    process = any("process_gpu_gib" in r for r in rows)  # whole runs, sampled from outside
    lines = [
        "| stack | batch | checkpointing | s/step | vs stock (same batch) | first step s | peak GiB | MFU |"
        + (" GPU whole process GiB |" if process else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if process else ""),
    ]
    lines += [_speed_row(r, base, process) for r in rows]
    lines += _runs(res)
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


def markdown(result: dict[str, Any]) -> str:
    """The whole report of one bench call."""
    lines = [
        f"## {result['arch']} — {result['date']}, {result['device']}",
        "",
        f"`{result['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    if result.get("stock"):
        lines += _stock(result["stock"])
    if result.get("calibrate"):
        lines += _calibrate(result["calibrate"])
    if result.get("budgets"):
        lines += _budgets(result["budgets"])
    if result.get("speed"):
        lines += ["", *markdown_speed(result["speed"])]
    return "\n".join(lines) + "\n"
