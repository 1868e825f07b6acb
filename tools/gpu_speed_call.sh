#!/usr/bin/env bash
# Issue #14 measurements on the GPU machine (SD3 Medium random weights, 1024 px): the isolated probe at batch 1
# and 4 (bf16 / CUDA graphs / fp8 compute: s/step and fp8's error), then whole CLI runs sampled from outside.
# Usage: tools/gpu_speed_call.sh OUT [probe|cli|all]  (the probe alone took the whole 10-minute call on an H100:
# run probe and cli in separate calls)
set -uo pipefail
out=$1; what=${2:-all}
m=.models/sd3-medium
[ -f $m/model_index.json ] || python3 -m sd3booth random-model $m --arch sd3-medium
if [ "$what" != cli ]; then
  for b in 1 4; do timeout 280 python3 tools/gpu_speed_probe.py $m $out/probe-b$b.json $b 2>&1 | grep -E "^(bf16|fp8)" ; done
fi
if [ "$what" != probe ]; then
  SD3BOOTH_PROFILE=20:3 python3 tools/gpu_card.py sd3-medium $m /tmp/cards graphs:40:default fp8:40:default:--base_compute,fp8 \
    2>&1 | grep '^{' | cut -c1-600
  cp /tmp/cards/card-sd3-medium.json $out/card-speed.json
  for r in graphs fp8; do cp /tmp/cards/$r/profile.json $out/profile-$r.json; done
fi
