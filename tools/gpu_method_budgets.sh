#!/usr/bin/env bash
# Issue #12 under tight budgets: does every --max_vram budget still hold with each training method? Whole
# `sd3booth train` runs (tools/gpu_card.py: 4 photos, 1024 px, batch 1, rank 16, AdamW unless the run names another
# optimizer, one validation image, default plan: compiled blocks), each under a hard allocator cap of the budget
# (sd3booth.bench.capped) and sampled from outside every 100 ms (NVML process memory, host RSS).
# A run holds when it ends with rc 0 and its whole process stayed within the budget as nvidia-smi counts it, or when
# the planner refused it before loading anything with its one line (rc 2, "--max_vram N GiB is below ...": the
# CPU tests predict that for --train_text_encoder at SD3 Medium 3 GiB and SD3.5 Large 6 GiB).
# Writes OUT/ARCH-BUDGET-GROUP/card-ARCH.json (gpu_card.py's rows) and OUT/method-budgets-ARCH-BUDGET-GROUP.json
# (per run: held, rc, whole-process / allocated / reserved peaks, the plan, the predicted peak, s/step, the error
# line and, after an out-of-memory error, the allocator's oom.json).
#
# Usage (GPU machine, repo root, wheels installed, PYTHONPATH=src):
#   tools/gpu_method_budgets.sh ARCH BUDGET GROUP OUT [STEPS]
#   ARCH   sd3-medium | sd3.5-large (the random true-size model is written to .models/ARCH when missing: a few
#          minutes, ~25 GB of disk for sd3.5-large)
#   GROUP  a group name below, or run names separated by commas (e.g. lora,dora)
#   STEPS  steps per run (default 20; the median s/step is taken over the windows after the first)
# Groups that fit ~8 minutes on an H100 (SD3 Medium ~50-70 s a run; SD3.5 Large ~2-2.5 min a run, host-bound
# loading of the swapped transformer):
#   sd3-medium:  adapters  = lora,dora,loha,lokr,text_encoder_lora,ema_gpu,base_model_prior
#                optimizers = lora,adamw8bit,prodigy,lion,lion8bit,adafactor,adamw_schedulefree,stableadamw
#   sd3.5-large: large-a = lora,dora,loha     large-b = lokr,text_encoder_lora,ema_gpu
#                large-c = base_model_prior,adamw8bit,prodigy    large-d = lion,lion8bit,adafactor
#                large-e = lora,adamw_schedulefree,stableadamw
# A CPU dry run of the script itself: tools/gpu_method_budgets.sh tiny 3 lora,dora /tmp/mb 4
set -euo pipefail
arch=${1:?ARCH}; budget=${2:?BUDGET}; group=${3:?GROUP}; out=${4:?OUT}; steps=${5:-20}
model=.models/$arch
[ -f $model/model_index.json ] || python3 -m sd3booth random-model $model --arch $arch

declare -A RUN=(
  [lora]=""
  [dora]="--lora_type,dora"
  [loha]="--lora_type,loha"
  [lokr]="--lora_type,lokr,--lokr_factor,16"
  [text_encoder_lora]="--train_text_encoder"
  [ema_gpu]="--use_ema,--ema_device,gpu"
  [base_model_prior]="--with_prior_preservation,--prior_preservation_mode,base_model,--class_prompt,a photo of a toy"
  [adamw8bit]="--optimizer,adamw8bit"
  [prodigy]="--optimizer,prodigy,--learning_rate,1.0"
  [lion]="--optimizer,lion,--learning_rate,3e-5"
  [lion8bit]="--optimizer,lion8bit,--learning_rate,3e-5"
  [adafactor]="--optimizer,adafactor"
  [adamw_schedulefree]="--optimizer,adamw_schedulefree"
  [stableadamw]="--optimizer,stableadamw"
)
declare -A GROUP=(
  [adapters]="lora,dora,loha,lokr,text_encoder_lora,ema_gpu,base_model_prior"
  [optimizers]="lora,adamw8bit,prodigy,lion,lion8bit,adafactor,adamw_schedulefree,stableadamw"
  [large-a]="lora,dora,loha"
  [large-b]="lokr,text_encoder_lora,ema_gpu"
  [large-c]="base_model_prior,adamw8bit,prodigy"
  [large-d]="lion,lion8bit,adafactor"
  [large-e]="lora,adamw_schedulefree,stableadamw"
)
names=${GROUP[$group]:-$group}
specs=()
for name in ${names//,/ }; do
  [ -n "${RUN[$name]+x}" ] || { echo "unknown run $name; known: ${!RUN[*]}" >&2; exit 2; }
  flags=${RUN[$name]}
  specs+=("$name:$steps:$budget${flags:+:$flags}")
done
dir=$out/$arch-$budget-${group//,/+}
mkdir -p "$dir"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
python3 tools/gpu_card.py "$arch" "$model" "$dir" "${specs[@]}"
python3 - "$dir" "$arch" "$budget" "$out/method-budgets-$arch-$budget-${group//,/+}.json" <<'PY'
import json, sys
from pathlib import Path
folder, arch, budget, dest = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
rows = json.loads((folder / f"card-{arch}.json").read_text())
out = []
for r in rows:
    refused = r["rc"] == 2 and (r.get("error") or "").startswith(f"error: --max_vram {budget:g} GiB is below")
    inside = [v for v in (r.get("stages_process_gpu") or {}).values() if v]  # the run's own sampler, per stage
    whole = max([r.get("process_gpu_gib") or 0.0, *inside])
    row = {"run": r["name"], "held": (r["rc"] == 0 and whole <= budget) or refused, "refused_by_planner": refused,
           "rc": r["rc"], "whole_process_gib": round(whole, 3), "allocated_gib": r.get("peak_gib"),
           "reserved_gib": r.get("peak_reserved_gib"), "predicted_process_gib": r.get("predicted_process_gib"),
           "predicted_peak_gib": r.get("predicted_peak_gib"), "allocator_cap_gib": r.get("allocator_cap_gib"),
           "training_allocated_gib": (r.get("stages") or {}).get("training"),
           "predicted_training_gib": (r.get("predicted") or {}).get("training"),
           "s_per_step": r.get("s_per_step"), "plan": r.get("plan"), "host_rss_gib": r.get("host_rss_gib"),
           "error": r.get("error")}  # fmt: skip
    oom = folder / r["name"] / "oom.json"
    if oom.exists():
        row["oom"] = json.loads(oom.read_text())
    out.append(row)
summary = {"arch": arch, "budget_gib": budget, "all_held": all(x["held"] for x in out), "rows": out}
dest.write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'run':<20} {'held':<5} {'rc':>3} {'process':>8} {'alloc':>6} {'pred':>6} {'s/step':>7}  plan / error")
for x in out:
    p = x["plan"] or {}
    what = (f"ckpt {p.get('checkpoint_blocks')} swap {p.get('swap_blocks')} T5 {p.get('t5')}" if p else "") or x["error"]
    print(f"{x['run']:<20} {str(x['held']):<5} {x['rc']:>3} {x['whole_process_gib']:>8.2f} {x['allocated_gib'] or 0:>6.2f} "
          f"{x['predicted_process_gib'] or 0:>6.2f} {x['s_per_step'] or 0:>7.3f}  {what}")
print(f"wrote {dest}; all held: {summary['all_held']}")
PY
