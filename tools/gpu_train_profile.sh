#!/usr/bin/env bash
# Steady-state s/step of whole `sd3booth train` runs (batch 1, 1024 px, default optimizer, logging every 10
# steps) with a profile of steps 41-43 (SD3BOOTH_PROFILE). Usage: tools/gpu_train_profile.sh ARCH OUT BUDGET...
set -euo pipefail
arch=$1; out=$2; shift 2
model=.models/$arch
[ -f $model/model_index.json ] || python3 -m sd3booth random-model $model --arch $arch
python3 -c "from pathlib import Path; from sd3booth.data.dataset import write_demo_like_dataset as w; w(Path('/tmp/photos'), n=4, size=1024)"
for b in "$@"; do
  extra=(); [ "$b" != default ] && extra=(--max_vram "$b")
  SD3BOOTH_PROFILE=40:3 python3 -m sd3booth train --pretrained_model_name_or_path $model --instance_data_dir /tmp/photos \
    --instance_prompt "a photo of sks toy" --output_dir $out/$b --overwrite_output_dir --resolution 1024 \
    --train_batch_size 1 --max_train_steps 50 --logging_steps 10 --rank 16 --seed 0 --report_to none \
    --checkpointing_steps 1000 "${extra[@]}" 2>&1 | grep -E "^  |profile of" || true
  rm -rf $out/$b/cache $out/$b/checkpoints
  python3 - $out/$b <<'PY'
import json, sys
m = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
print(sys.argv[1], "s/step by interval:", [round(x["s_per_step"], 3) for x in m], "peak", round(max(x["peak_gpu_gib"] for x in m), 2))
PY
done
