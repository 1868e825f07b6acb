#!/usr/bin/env bash
# Aspect-ratio buckets on the GPU (issue #11): whole `sd3booth train` runs on a random true-size model at 1024 px
# on a mixed-aspect folder (3:4, 4:3, 9:16 and square photos: 4 buckets), results as JSON in OUT/buckets-PART.json.
#   PART speed   : square crops (--no-enable_bucket) vs buckets with static shapes (one compilation per bucket) vs
#                  buckets with dynamic shapes (SD3BOOTH_COMPILE_SHAPES); s/step after the first epoch, wall time
#                  with compilation, peak memory. Target: buckets within 5% of square.
#   PART budgets : each --max_vram budget with buckets on, under a hard allocator cap of that budget
#                  (python -m sd3booth.bench.capped): rc 0 and the whole process within the budget.
#   PART recheck : the --max_vram 3 failure of 2026-11-25, taken apart (BUDGET, default 3): buckets with the
#                  planner's headroom for 4 shapes (the new plan), buckets with the old plan (SD3BOOTH_PLAN_SHAPES=1:
#                  planned as for one shape; expandable segments now on), the same plan on square crops (one
#                  shape), and buckets with dynamic shapes. Each row: allocated / reserved / whole-process peaks,
#                  the plan and its headroom line; a failed run's oom.json (fragments, the failed request).
# Usage on the GPU machine (repo root, wheels installed, PYTHONPATH=src):
#   tools/gpu_buckets.sh sd3-medium OUT speed [STEPS]             (~6 min on an H100 with 120 steps)
#   tools/gpu_buckets.sh sd3-medium OUT budgets [BUDGETS] [STEPS] (BUDGETS default 3,4,6,8,default; 30 steps)
#   tools/gpu_buckets.sh sd3-medium OUT recheck [BUDGET] [STEPS]  (4 runs, ~6-8 min with 30 steps)
# (RES and EXTRA, e.g. RES=64 EXTRA="--bucket_reso_steps 16", shrink it for a CPU smoke test with --arch tiny.)
# Budgeted runs start through sd3booth.bench.capped, which sets PYTORCH_CUDA_ALLOC_CONF before CUDA starts; the
# launcher used until 2026-11-25 started CUDA first, so those budget rows ran without expandable segments.
set -euo pipefail
arch=${1:-sd3-medium}; out=${2:-/tmp/buckets}; part=${3:-speed}; res=${RES:-1024}
mkdir -p "$out"
model=.models/$arch
if [ ! -f $model/model_index.json ]; then
  t0=$(date +%s); python3 -m sd3booth random-model $model --arch $arch; echo "random-model $arch: $(( $(date +%s) - t0 )) s"
fi
photos=$out/photos
python3 - "$photos" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
sizes = [(1536, 2048)] * 4 + [(2048, 1536)] * 3 + [(1152, 2048)] * 2 + [(1600, 1600)] * 3  # 12 phone-like photos
rng = np.random.default_rng(0)
for i, (w, h) in enumerate(sizes):
    p = root / f"photo_{i:02d}.jpg"
    if not p.exists():  # smooth noise (a JPEG of white noise would be needlessly large)
        small = rng.integers(0, 255, (h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(p, quality=90)
print(f"{len(sizes)} photos in {root}")
PY

# one training run; $1 name, $2 budget GiB or "default", rest: extra flags. Capped at the budget when one is given.
train() {
  local name=$1 budget=$2; shift 2
  local extra=() launch=(python3 -m sd3booth)
  if [ "$budget" != default ]; then extra=(--max_vram "$budget"); launch=(python3 -m sd3booth.bench.capped "$budget"); fi
  local t0; t0=$(date +%s.%N)
  set +e
  "${launch[@]}" train --pretrained_model_name_or_path $model --instance_data_dir "$photos" \
    --instance_prompt "a photo of sks toy" --output_dir "$out/$name" --cache_dir "$out/cache-$name" \
    --overwrite_output_dir --resolution $res --train_batch_size 1 --rank 16 --seed 0 --lr_warmup_steps 0 \
    --report_to none --checkpointing_steps 100000 --logging_steps 4 ${EXTRA:-} "${extra[@]}" "$@" \
    > "$out/$name.log" 2>&1
  local rc=$?
  set -e
  python3 - "$out" "$name" "$budget" "$rc" "$(python3 -c "import time; print(round(time.time() - $t0, 1))")" <<'PY'
import json, statistics, sys
from pathlib import Path
out, name, budget, rc, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
log = (out / f"{name}.log").read_text(errors="replace")
row = {"run": name, "budget_gib": budget, "rc": rc, "wall_s": wall}
row["compile_line"] = next((l.strip() for l in log.splitlines() if l.startswith("compiling")), None)
row["plan_lines"] = [l.strip() for l in log.splitlines()
                     if l.startswith(("  transformer weights", "  checkpointing", "  batch shapes", "  GPU allocator cap",
                                      "  predicted peak", "allocator:"))]
lines = log.splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith(("aspect-ratio buckets", "square training size"))), None)
if start is not None:  # the table printed before training: its header and the indented rows under it
    end = next((j for j in range(start + 1, len(lines)) if not lines[j].startswith("  ")), len(lines))
    row["bucket_table"] = lines[start:end]
if rc == 0:
    run = out / name
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stages = json.loads((run / "stages.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    epoch = 12  # photos per epoch at batch 1
    steady = [m["s_per_step"] for m in metrics if m["step"] > 2 * epoch]  # windows after the first two epochs
    row["steady_s_per_step_median"] = round(statistics.median(steady), 4) if steady else None
    row["steady_s_per_step_mean"] = round(statistics.mean(steady), 4) if steady else None
    steps = [0] + [m["step"] for m in metrics]
    row["first_epoch_s"] = round(sum(m["s_per_step"] * (m["step"] - steps[i]) for i, m in enumerate(metrics)
                                     if m["step"] <= epoch), 1)  # compilation included
    row["windows"] = [(m["step"], round(m["s_per_step"], 4)) for m in metrics]
    row["peak_gib"] = max(s.get("peak_allocated_gib", 0) for s in stages)
    row["peak_reserved_gib"] = max(s.get("peak_reserved_gib", 0) for s in stages)
    row["peak_process_gpu_gib"] = max(s.get("peak_process_gpu_gib", 0) for s in stages)  # the run's own sampler
    row["stages"] = {s["stage"]: [s.get("peak_allocated_gib"), s.get("peak_reserved_gib"), s["seconds"]] for s in stages}
    row["plan"] = {k: plan[k] for k in ("base", "checkpoint_blocks", "swap_blocks", "t5", "compiled")}
    row["predicted_peak_gib"] = max(plan["predicted"].values())
    row["allocator_cap_gib"] = plan.get("allocator_cap_gib")
    row["shapes"], row["shape_headroom_gib"] = plan.get("shapes"), plan.get("shape_headroom_gib")
    row["allocator_settings"] = plan.get("allocator_settings")  # expandable segments on?
else:
    row["error"] = log.strip().splitlines()[-1][:300] if log.strip() else "?"
    oom = out / name / "oom.json"
    if oom.exists():  # the allocator at the failure: allocated, reserved, split-off fragments, the failed request
        row["oom"] = json.loads(oom.read_text())
    plan_file = out / name / "plan.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        row["plan"] = {k: plan[k] for k in ("base", "checkpoint_blocks", "swap_blocks", "t5", "compiled")}
        row["allocator_cap_gib"] = plan.get("allocator_cap_gib")
        row["shapes"], row["shape_headroom_gib"] = plan.get("shapes"), plan.get("shape_headroom_gib")
with (out / "rows.jsonl").open("a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps({k: row.get(k) for k in ("run", "rc", "wall_s", "steady_s_per_step_median", "peak_gib",
                                          "peak_reserved_gib", "peak_process_gpu_gib", "plan", "compile_line")}))
PY
}

python3 -c "import torch, diffusers; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'diffusers', diffusers.__version__)"
rm -f "$out/rows.jsonl"
if [ "$part" = speed ]; then
  steps=${4:-120}
  train square default --no-enable_bucket --max_train_steps "$steps"
  SD3BOOTH_COMPILE_SHAPES=static train buckets-static default --max_train_steps "$steps"
  SD3BOOTH_COMPILE_SHAPES=dynamic train buckets-dynamic default --max_train_steps "$steps"
elif [ "$part" = recheck ]; then
  b=${4:-3}; steps=${5:-30}
  train "recheck-$b-buckets" "$b" --max_train_steps "$steps"
  SD3BOOTH_PLAN_SHAPES=1 train "recheck-$b-old-plan" "$b" --max_train_steps "$steps"
  SD3BOOTH_PLAN_SHAPES=1 train "recheck-$b-square" "$b" --no-enable_bucket --max_train_steps "$steps"
  SD3BOOTH_COMPILE_SHAPES=dynamic train "recheck-$b-dynamic" "$b" --max_train_steps "$steps"
else
  budgets=${4:-3,4,6,8,default}; steps=${5:-30}
  for b in ${budgets//,/ }; do train "budget-$b" "$b" --max_train_steps "$steps"; done
fi
python3 - "$out" "$part" <<'PY'
import json, sys
from pathlib import Path
out, part = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
summary = {"part": part, "rows": rows}
by = {r["run"]: r for r in rows}
if part == "speed" and all(by.get(k, {}).get("steady_s_per_step_median") for k in ("square", "buckets-static")):
    sq = by["square"]["steady_s_per_step_median"]
    for k in ("buckets-static", "buckets-dynamic"):
        if by.get(k, {}).get("steady_s_per_step_median"):
            summary[f"{k}_over_square"] = round(by[k]["steady_s_per_step_median"] / sq, 4)
if part in ("budgets", "recheck"):  # the whole process (the run's own NVML sampler) within the budget
    summary["held"] = {r["run"]: r["rc"] == 0 and (r["budget_gib"] == "default" or
                                                   max(r["peak_gib"], r.get("peak_process_gpu_gib") or 0) <= float(r["budget_gib"]))
                       for r in rows}
(out / f"buckets-{part}.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
PY
