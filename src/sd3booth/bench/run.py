"""``sd3booth bench``: run the parts asked for, fit the calibration from what they measured, write the result
(``bench-ARCH.json``), its markdown (``bench-ARCH.md``) and the fitted ``calibration.json`` under the output
folder. The parts are described in :mod:`sd3booth.bench`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.bench.harness import RANK

PARTS = ("stock", "calibrate", "budgets", "speed", "long", "reference", "whole", "coldstart")
SCRIPT_PARTS = ("reference", "whole")  # the parts that run diffusers' script (--reference_script)
REFERENCE_MIN_STEPS = 20  # reference: enough logged steps for a median after the warm-up


def _header(arch: str, command: str) -> dict[str, Any]:
    import accelerate
    import diffusers
    import peft
    import transformers

    from sd3booth import __version__

    return {
        "arch": arch,
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0),
        "command": command,
        "versions": {
            "sd3booth": __version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }


def _model(arch: str, model_dir: Path | None, out: Path, log: Callable[[str], None]) -> Path:
    from sd3booth.random_model import write_random_model

    model_dir = model_dir or out / f"model-{arch}"
    if not (model_dir / "model_index.json").is_file():
        t0 = time.perf_counter()
        write_random_model(model_dir, arch)
        log(f"random {arch} written in {time.perf_counter() - t0:.0f} s")
    return model_dir


def _calibration_parts(result: dict[str, Any], parts: list[str], model_dir: Path, out: Path, steps: int,
                       budgets: list, resolution: int, optimizer: str, log: Callable[[str], None]) -> None:  # fmt: skip
    """The parts that refit the calibration, in turn; each starts from the previous one's fit, else from the
    packaged calibration (which also supplies what this call does not measure). The fit so far is written
    to ``out/calibration.json`` after each part, so a later part that fails costs nothing of it."""
    from sd3booth.bench import fit
    from sd3booth.plan.calibration import arrange, dumps, load_calibration
    from sd3booth.plan.sizes import ModelSizes

    def save(cal: dict[str, Any]) -> None:
        result["calibration"] = arrange(cal, strict=False)
        (out / "calibration.json").write_text(dumps(result["calibration"]))

    where = f"{result['device']}, {result['date']}"
    if "calibrate" in parts:
        from sd3booth.bench.calibrate import bench_calibrate

        measured = bench_calibrate(model_dir, steps, RANK, log)
        result["calibrate"] = {**measured, "device": result["device"], "date": result["date"]}
        save(fit.fit_calibration(result["calibrate"], load_calibration()))
    if "budgets" in parts:
        from sd3booth.bench.budgets import bench_budgets

        result["budgets"] = bench_budgets(model_dir, out, budgets, resolution, max(steps, 6), result["arch"], log,
                                          optimizer)  # fmt: skip
        sizes = {result["arch"]: ModelSizes(**result["sizes"])}
        save(fit.fit_pipeline_decode(result.get("calibration") or load_calibration(), result["budgets"], sizes, where))
    if "speed" in parts:
        from sd3booth.bench.speed import bench_speed

        sp = result["speed"] = bench_speed(model_dir, steps, RANK, log)
        measured = {**sp, "device": result["device"], "date": result["date"]}
        cal = result.get("calibration") or load_calibration()
        save(fit.fit_compiled(cal, measured, sp["hidden"], sp["n_blocks"], sp["tokens"]))


def _run_parts(result: dict[str, Any], parts: list[str], script: Path | None, model_dir: Path, out: Path,
               resolution: int, steps: int, long_steps: int, log: Callable[[str], None]) -> None:  # fmt: skip
    """The parts of whole training runs (:mod:`sd3booth.bench.runs`): their rows join the speed table."""
    from sd3booth.bench import runs

    speed = result.setdefault("speed", {})
    rows = speed.setdefault("rows", [])
    if "reference" in parts:
        ref = runs.bench_reference(script, model_dir, out, resolution, max(steps, REFERENCE_MIN_STEPS), log)
        rows += ref["rows"]
        speed["ratios"] = ref["ratios"]
    if "whole" in parts:
        speed["whole_run"] = runs.bench_whole(script, model_dir, out, resolution, long_steps or 1000, log)
    if "coldstart" in parts:
        rows += runs.bench_coldstart(model_dir, out, resolution, max(steps, 10), log)


def run_bench(
    arch: str,
    model_dir: Path | None,
    out: Path,
    parts: list[str],
    resolutions: list[int],
    budgets: list[float | None],
    steps: int,
    command: str,
    log: Callable[[str], None] = print,
    long_steps: int = 0,
    optimizer: str = "adamw8bit",
    reference_script: str | None = None,
) -> dict[str, Any]:
    """Runs ``parts`` on a random true-size ``arch`` (or ``model_dir``); returns the result written to ``out``."""
    from sd3booth.bench.reference import check_script
    from sd3booth.errors import UserError
    from sd3booth.models.source import quiet_libraries
    from sd3booth.plan.sizes import read_sizes

    if unknown := [p for p in parts if p not in PARTS]:
        raise UserError(f"unknown bench part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    needs_script = [p for p in parts if p in SCRIPT_PARTS]
    if needs_script and not reference_script:
        raise UserError(f"bench --parts {','.join(needs_script)} times diffusers' script: pass --reference_script PATH")
    script = check_script(reference_script) if reference_script else None
    if not torch.cuda.is_available():
        raise UserError("sd3booth bench measures GPU memory and needs a CUDA GPU")
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = _model(arch, model_dir, out, log)
    result = _header(arch, command)
    result["sizes"] = read_sizes(model_dir).__dict__  # what a later refit needs to recompute predictions
    if "stock" in parts:
        from sd3booth.bench.stock import bench_stock

        result["stock"] = bench_stock(model_dir, resolutions, steps, RANK)
        log(f"stock: {result['stock']}")
    _calibration_parts(result, parts, model_dir, out, steps, budgets, resolutions[0], optimizer, log)
    if "long" in parts:
        from sd3booth.bench.speed import bench_long

        result.setdefault("speed", {})["long_run"] = bench_long(model_dir, RANK, long_steps or 500, log)
    if any(p in parts for p in ("reference", "whole", "coldstart")):
        try:
            _run_parts(result, parts, script, model_dir, out, resolutions[0], steps, long_steps, log)
        except UserError:  # the script failed: keep what the earlier parts measured
            (out / f"bench-{arch}.json").write_text(json.dumps(result, indent=2) + "\n")
            raise
    from sd3booth.bench.report import markdown

    (out / f"bench-{arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"bench-{arch}.md").write_text(markdown(result))
    log(markdown(result))
    return result
