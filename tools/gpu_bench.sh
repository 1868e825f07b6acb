#!/usr/bin/env bash
# One `sd3booth bench` call on the GPU machine, the random model written once under .models/ (git-ignored,
# kept between calls while the machine stays warm). Usage: tools/gpu_bench.sh ARCH OUT [bench flags...]
# The code is src/sd3booth/bench/ (parts: stock, calibrate, budgets, speed, long, reference, whole, coldstart). To feed the packaged
# calibration: copy OUT/bench-ARCH.json into bench/results/, name it in bench/results/calibration-sources.json
# and run `sd3booth bench --refit bench/results` (no GPU needed; docs/calibration.md).
set -euo pipefail
arch=$1; out=$2; shift 2
model=.models/$arch
if [ ! -f $model/model_index.json ]; then
  t0=$(date +%s); python3 -m sd3booth random-model $model --arch $arch; echo "random-model $arch: $(( $(date +%s) - t0 )) s"
fi
python3 -m sd3booth bench --arch $arch --model_dir $model --output_dir $out "$@"
