"""Whole `sd3booth train` runs on the GPU machine, measured as the user's card and computer see them.

Each run is the real CLI in a child process (bench.budgets.budget_command: 4 photos, batch 1, rank 16, one
validation), sampled from outside every 100 ms for NVML process memory and host RSS (bench.budgets.run_sampled),
with the run's own stages.json / plan.json / metrics.jsonl read back. Writes OUT/card-ARCH.json.

  python3 tools/gpu_card.py ARCH MODEL_DIR OUT RUN [RUN ...]
  RUN = NAME:STEPS:BUDGET[:extra flags separated by commas]   (BUDGET 'default' = no --max_vram)
e.g. t4:200:14.1:--mixed_precision,fp16,--max_ram,11
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from sd3booth.bench.budgets import budget_command, read_run, run_sampled
from sd3booth.data.dataset import write_demo_like_dataset


def one(arch: str, model: Path, out: Path, spec: str, resolution: int = 1024) -> dict:
    name, steps, budget, *extra = spec.split(":")
    flags = extra[0].split(",") if extra else []
    photos = out / "photos"
    if not photos.is_dir():
        write_demo_like_dataset(photos, n=4, size=resolution)
    run = out / name
    b = None if budget == "default" else float(budget)
    cmd = budget_command(model, photos, run, resolution, int(steps), "adamw", b) + flags
    r, gpu, host, parts = run_sampled(cmd)
    row = {"name": name, "arch": arch, "budget_gib": b, "flags": flags, "steps": int(steps), "rc": r.returncode,
           "process_gpu_gib": gpu, "host_rss_gib": host, "host_rss_parts_gib": parts}  # fmt: skip
    if r.returncode == 0:
        row.update(read_run(run, 5 if int(steps) >= 15 else 1))
        losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        row["all_losses_finite"] = all(math.isfinite(v) for v in losses)
        row["last_loss"] = losses[-1]
    row["stdout_tail"] = [x for x in r.stdout.splitlines() if "overflow" in x or "memory plan" in x][:5]
    row["error"] = (r.stderr.strip().splitlines() or [""])[-1][:400] if r.returncode else None
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str]) -> int:
    arch, model, out, *specs = argv
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = 64 if arch == "tiny" else 1024  # tiny: a CPU dry run of this script
    rows = [one(arch, Path(model), out_dir, s, res) for s in specs]
    (out_dir / f"card-{arch}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
