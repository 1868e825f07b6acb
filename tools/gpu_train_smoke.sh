#!/usr/bin/env bash
# Whole `sd3booth train` run on a random true-size SD3 at 1024 px on one GPU: per-stage peak memory and s/step.
# Usage on the GPU machine (repo root, wheels installed, PYTHONPATH set): tools/gpu_train_smoke.sh ARCH OUT [extra flags]
set -euo pipefail
arch=${1:-sd3-medium}; out=${2:-/tmp/smoke}; shift 2 || true
model=/tmp/model-$arch
python3 - <<PY
import torch, diffusers, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
PY
t0=$(date +%s)
[ -f $model/model_index.json ] || python3 -m sd3booth random-model $model --arch $arch
echo "random-model: $(( $(date +%s) - t0 )) s"; du -sh $model
python3 -c "from pathlib import Path; from sd3booth.data.dataset import write_demo_like_dataset as w; w(Path('/tmp/photos'), n=4, size=1024)"
python3 -m sd3booth train --pretrained_model_name_or_path $model --instance_data_dir /tmp/photos \
  --output_dir $out --overwrite_output_dir --resolution 1024 --train_batch_size 1 --max_train_steps 20 \
  --gradient_checkpointing --rank 16 --optimizer adamw8bit --mixed_precision bf16 --seed 0 --lr_warmup_steps 0 \
  --validation_prompt "a photo of sks toy" --num_validation_images 1 --validation_steps 10 --num_inference_steps 4 \
  --checkpointing_steps 10 --report_to none "$@"
python3 - "$out" <<'PY'
import json, sys, statistics
out = sys.argv[1]
for r in json.load(open(f"{out}/stages.json")):
    print(f"{r['stage']:<28} {r['seconds']:8.2f} s  peak alloc {r.get('peak_allocated_gib', 0):6.2f} GiB  reserved {r.get('peak_reserved_gib', 0):6.2f} GiB")
m = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
tail = [x["s_per_step"] for x in m[2:]]
print(f"s/step median (steps 3..{len(m)}): {statistics.median(tail):.3f}; first step {m[0]['s_per_step']:.2f} s; peak {max(x['peak_gpu_gib'] for x in m):.2f} GiB")
PY
