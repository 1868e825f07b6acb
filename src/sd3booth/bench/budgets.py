"""``bench --parts budgets``: the real ``sd3booth train`` CLI, one subprocess per ``--max_vram`` budget.

Each budgeted run goes through :mod:`sd3booth.bench.capped`, which caps the process's GPU memory at the budget
(``torch.cuda.set_per_process_memory_fraction``) before the CLI starts, so a plan that exceeds its budget fails
with an out-of-memory error instead of reporting a number. The workload is fixed (:data:`WORKLOAD`) so that the
planner's prediction for each row can be recomputed later from the row alone (:func:`budget_workload`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# what every budget run trains: 4 photos, batch 1, rank 16, 77 T5 tokens, one validation image
WORKLOAD = {"rank": 16, "t5_len": 77, "batch": 1, "validation_images": 1, "prompt": "a photo of sks toy"}
# budget rows written before the optimizer was recorded ran AdamW8bit (git history of bench.py, 2026-11-22)
OPTIMIZER_BEFORE_RECORDED = "adamw8bit"


def budget_command(
    model_dir: Path,
    photos: Path,
    run: Path,
    resolution: int,
    steps: int,
    optimizer: str,
    budget: float | None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """The command line of one budget run: ``sd3booth train`` under a hard cap of ``budget`` GiB (none for
    the default budget); ``extra`` flags replace or add to the workload's."""
    w = WORKLOAD
    # the loss is read back (a host sync) only at log steps, as in a real run; a compiled run logs its first
    # step (compilation) alone
    log_every = 5 if steps >= 15 else 1
    args = {
        "--pretrained_model_name_or_path": model_dir, "--instance_data_dir": photos, "--instance_prompt": w["prompt"],
        "--output_dir": run, "--cache_dir": run / "cache", "--resolution": resolution,
        "--train_batch_size": w["batch"], "--max_train_steps": steps, "--rank": w["rank"],
        "--max_sequence_length": w["t5_len"], "--optimizer": optimizer, "--seed": 0, "--lr_warmup_steps": 0,
        "--validation_prompt": w["prompt"], "--num_validation_images": w["validation_images"],
        "--validation_steps": steps, "--num_inference_steps": 4, "--checkpointing_steps": steps,
        "--report_to": "none", "--logging_steps": log_every,
    }  # fmt: skip
    if budget:
        args["--max_vram"] = budget
    args.update(extra or {})
    cli = ["train", "--overwrite_output_dir", *[str(x) for kv in args.items() for x in kv]]
    if budget:
        return [sys.executable, "-m", "sd3booth.bench.capped", str(budget), *cli]
    return [sys.executable, "-m", "sd3booth", *cli]


def read_run(run: Path, log_every: int) -> dict[str, Any]:
    """What a finished budget run wrote: per-stage peaks, step times, the plan and its prediction."""
    from sd3booth.plan.choose import PLAN_SETTINGS

    stages = json.loads((run / "stages.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    row: dict[str, Any] = {
        "peak_gib": max(s.get("peak_allocated_gib", 0) for s in stages),
        "peak_reserved_gib": max(s.get("peak_reserved_gib", 0) for s in stages),
        "stages": {s["stage"]: s.get("peak_allocated_gib") for s in stages},
        # per-interval step times; the first interval holds the warm-up (and compilation, when compiled)
        "s_per_step": round(statistics.median(m["s_per_step"] for m in metrics[1 if log_every > 1 else 2 :]), 4),
    }
    if metrics[0]["step"] == 1:  # logged alone: compiled runs, or logging every step
        row["first_step_s"] = round(metrics[0]["s_per_step"], 2)
    if "compile_cache" in metrics[0]:  # whether the first step compiled (host RSS: bench.fit.compiled_cold)
        row["compile_cache"] = metrics[0]["compile_cache"]
    row["stages_process_gpu"] = {s["stage"]: s.get("peak_process_gpu_gib") for s in stages}
    row["stages_host_rss"] = {s["stage"]: s.get("peak_host_rss_gib") for s in stages}
    row["stages_host_rss_parts"] = {s["stage"]: s.get("peak_host_rss_parts_gib") for s in stages}
    row["plan"] = {k: plan[k] for k in PLAN_SETTINGS}
    row["predicted_s_per_step"] = plan["predicted_s_per_step"]
    row["predicted_peak_gib"] = max(plan["predicted"].values())
    row["predicted"] = plan["predicted"]
    if plan.get("allocator_cap_gib"):  # since the budget counts the whole process (issue #10)
        cap = plan["allocator_cap_gib"]
        row["allocator_cap_gib"] = cap
        row["predicted_process_gib"] = round(row["predicted_peak_gib"] + plan["budget_gib"] - cap, 3)
        row["predicted_host_gib"] = max(plan["predicted_host"].values())
    return row


def run_sampled(
    cmd: list[str], interval: float = 0.1, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float, float, dict[str, float]]:
    """Runs ``cmd`` (with ``env`` added to this process's environment) while sampling, from outside, its process
    tree's GPU memory (NVML, as nvidia-smi shows it) and host RSS every ``interval`` s; returns (result, peak GPU
    GiB, peak host GiB, the host RSS parts at that peak: anon / file / shmem GiB, see
    ``models.memory.host_rss_breakdown``)."""
    import os

    from sd3booth.models.memory import host_rss_breakdown, process_gpu_gib

    environ = {**os.environ, **env} if env else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    peak_gpu = peak_host = 0.0
    peak_parts: dict[str, float] = {}
    import threading

    done = threading.Event()

    def sample() -> None:
        nonlocal peak_gpu, peak_host, peak_parts
        while not done.wait(interval):
            try:
                host, parts = host_rss_breakdown(proc.pid)
                if host >= peak_host:
                    peak_host, peak_parts = host, parts
                peak_gpu = max(peak_gpu, process_gpu_gib(0, proc.pid) or 0.0)
            except Exception:  # noqa: BLE001 - the process may end between two samples
                pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return result, round(peak_gpu, 3), round(peak_host, 3), peak_parts


def bench_budgets(
    model_dir: Path,
    out: Path,
    budgets: list[float | None],
    resolution: int,
    steps: int,
    arch: str,
    log: Callable[[str], None],
    optimizer: str = "adamw8bit",
) -> list[dict[str, Any]]:
    """One ``sd3booth train`` run per budget (None: the default budget, uncapped); a row per run."""
    from sd3booth.data.dataset import write_demo_like_dataset

    photos = out / "photos"
    if not photos.is_dir():
        write_demo_like_dataset(photos, n=4, size=resolution)
    rows = []
    for budget in budgets:
        run = out / (f"budget-{budget:g}" if budget else "default")
        t0 = time.perf_counter()
        cmd = budget_command(model_dir, photos, run, resolution, steps, optimizer, budget)
        r, gpu, host, parts = run_sampled(cmd)
        row: dict[str, Any] = {"arch": arch, "budget_gib": budget, "optimizer": optimizer, "resolution": resolution,
                               "rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                               "process_gpu_gib": gpu, "host_rss_gib": host, "host_rss_parts_gib": parts}  # fmt: skip
        if r.returncode == 0:
            row.update(read_run(run, 5 if steps >= 15 else 1))
        else:
            row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        rows.append(row)
        log(json.dumps(row))
    return rows


def budget_workload(row: dict[str, Any], sizes: Any) -> Any:
    """The planner's Workload of a budget row (``plan.predict.Workload``), for recomputing its prediction."""
    from sd3booth.config import DEFAULT_LORA_LAYERS
    from sd3booth.plan.choose import Workload

    w = WORKLOAD
    return Workload(
        resolution=row["resolution"],
        batch=w["batch"],
        t5_len=w["t5_len"],
        rank=w["rank"],
        lora_params=sizes.n_blocks * len(DEFAULT_LORA_LAYERS) * 2 * w["rank"] * sizes.hidden,
        optimizer=row.get("optimizer", OPTIMIZER_BEFORE_RECORDED),
        validation=True,
        class_images=False,
        validation_batch=w["validation_images"],
    )
