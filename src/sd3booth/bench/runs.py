"""``bench --parts reference``, ``whole`` and ``coldstart``: whole training runs, each a subprocess sampled from
outside (:func:`sd3booth.bench.budgets.run_sampled`), ours (the real ``sd3booth train``) beside diffusers' script
(:mod:`sd3booth.bench.reference`), on the same model, photos and instance prompt, batch 1, rank 16.

* ``reference``: s/step of the script at its fastest, of our default plan and of ``--max_vram 3``, with the
  ratios the speed targets of issue #14 use (:func:`ratios`). Ours runs torch AdamW as the script does.
* ``whole``: wall time of an N-step run of each, from process start to exit: loading, caching, compilation
  (ours with an empty compile cache, as a user's first run), two validations of one 28-step image each (the
  script's after its first epoch and at the end; ours half-way and at the end) and the saved LoRA.
* ``coldstart``: our default plan twice with one fresh compile cache (``SD3BOOTH_COMPILE_CACHE``): the first
  step with nothing compiled, then with the first run's compilations (:mod:`sd3booth.models.speed`).

The rows join the speed table (``result["speed"]["rows"]``, marked ``"measured": "run"``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd3booth.bench import budgets, reference

PROMPT = budgets.WORKLOAD["prompt"]
SMALL_BUDGET = 3.0  # GiB: the low-memory plan the targets compare with our default
# issue #14's targets, as ratios (at most)
TARGETS = {"default_vs_reference": 0.40, "small_vs_default": 1.5, "whole_vs_reference": 0.5}
VALIDATION_STEPS = 28  # the SD3 pipeline's default, which the script's validation uses


def ours_label(budget: float | None, note: str = "") -> str:
    return "ours: sd3booth train " + (f"--max_vram {budget:g}" if budget else "default plan") + note


def _checkpointing(plan: dict[str, Any]) -> str:
    n = plan.get("checkpoint_blocks", 0)
    return "none" if not n else f"{n} blocks"


def our_row(label: str, r: Any, gpu: float, host: float, wall: float, run: Path, steps: int) -> dict[str, Any]:
    """The speed-table row of one finished ``sd3booth train`` run (``r``: its CompletedProcess)."""
    row: dict[str, Any] = {"stack": label, "batch": 1, "measured": "run", "steps": steps, "wall_s": wall,
                           "process_gpu_gib": gpu, "host_rss_gib": host}  # fmt: skip
    if r.returncode != 0:
        return {**row, "checkpointing": "-", "s_per_step": None, "first_step_s": None, "peak_gib": None,
                "error": reference.failure_line(r.stderr)}  # fmt: skip
    got = budgets.read_run(run, 5 if steps >= 15 else 1)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    row.update(checkpointing=_checkpointing(got["plan"]), s_per_step=got["s_per_step"], plan=got["plan"],
               first_step_s=got.get("first_step_s"), peak_gib=round(got["peak_gib"], 3))  # fmt: skip
    if "compile_cache" in first:
        row["compile_cache"] = first["compile_cache"]
    return row


def run_ours(
    model_dir: Path, photos: Path, run: Path, resolution: int, steps: int, budget: float | None, label: str,
    log: Callable[[str], None], extra: dict[str, Any] | None = None, env: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One ``sd3booth train`` run (torch AdamW, the script's optimizer), timed and sampled; its row."""
    cmd = budgets.budget_command(model_dir, photos, run, resolution, steps, "adamw", budget, extra)
    t0 = time.perf_counter()
    r, gpu, host, _parts = budgets.run_sampled(cmd, env=env)
    row = our_row(label, r, gpu, host, round(time.perf_counter() - t0, 1), run, steps)
    log(f"run {row}")
    return row


def _photos(out: Path, resolution: int) -> Path:
    """The bench's photos (4, at the training size) without metadata.jsonl: both trainers read the images
    alone, with the instance prompt."""
    from sd3booth.data.dataset import write_demo_like_dataset

    photos = out / "photos"
    if not photos.is_dir():
        write_demo_like_dataset(photos, n=4, size=resolution)
    return reference.image_folder(photos, out / "photos-only")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The targets' ratios from the rows of ``reference``: ours default / script, ours --max_vram 3 / ours
    default (None where a run failed)."""
    s = {r["stack"]: r.get("s_per_step") for r in rows}
    default = s.get(ours_label(None))
    return {
        "default_vs_reference": ratio(default, s.get(reference.LABEL)),
        "small_vs_default": ratio(s.get(ours_label(SMALL_BUDGET)), default),
    }


def bench_reference(
    script: Path, model_dir: Path, out: Path, resolution: int, steps: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The script first (a failure ends the bench before ours run), then our default plan and --max_vram 3."""
    photos = _photos(out, resolution)
    rows = [reference.run_reference(script, model_dir, photos, out / "reference", resolution, steps, PROMPT, False,
                                    log)]  # fmt: skip
    for budget in (None, SMALL_BUDGET):
        name = f"ours-{budget:g}" if budget else "ours-default"
        rows.append(run_ours(model_dir, photos, out / name, resolution, steps, budget, ours_label(budget), log))
    return {"rows": rows, "ratios": ratios(rows)}


def bench_whole(
    script: Path, model_dir: Path, out: Path, resolution: int, steps: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Wall time of a ``steps``-step run of each, everything included (see the module's docstring)."""
    photos = _photos(out, resolution)
    ref = reference.run_reference(script, model_dir, photos, out / "whole-reference", resolution, steps, PROMPT,
                                  True, log)  # fmt: skip
    cache = out / "whole-compile-cache"
    for fresh in (cache, out / "whole-ours"):  # nothing compiled or cached by an earlier call
        shutil.rmtree(fresh, ignore_errors=True)
    validation = {"--validation_steps": max(steps // 2, 1), "--num_inference_steps": VALIDATION_STEPS}
    ours = run_ours(model_dir, photos, out / "whole-ours", resolution, steps, None, ours_label(None), log,
                    validation, {"SD3BOOTH_COMPILE_CACHE": str(cache)})  # fmt: skip
    res = {"steps": steps, "reference_s": ref["wall_s"], "ours_s": ours["wall_s"] if "error" not in ours else None,
           "reference": ref, "ours": ours}  # fmt: skip
    res["whole_vs_reference"] = ratio(res["ours_s"], res["reference_s"])
    log(f"whole run {res}")
    return res


def bench_coldstart(model_dir: Path, out: Path, resolution: int, steps: int, log: Callable[[str], None] = print,
                    extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Our default plan twice with one fresh compile cache: cold, then warm (same run folder, so the text and
    latent caches are warm for the second run too; the first step is timed after the model is loaded)."""
    photos = _photos(out, resolution)
    cache = out / "coldstart-compile-cache"
    for fresh in (cache, out / "coldstart"):
        shutil.rmtree(fresh, ignore_errors=True)
    rows = []
    for state in ("cold", "warm"):
        rows.append(run_ours(model_dir, photos, out / "coldstart", resolution, steps, None,
                             ours_label(None, f", compile cache {state}"), log, extra,
                             {"SD3BOOTH_COMPILE_CACHE": str(cache)}))  # fmt: skip
    return rows
