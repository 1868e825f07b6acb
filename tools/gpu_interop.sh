#!/usr/bin/env bash
# Files and formats at true size on the GPU machine (issue #13): LoRA extraction layer by layer on the GPU,
# single-file conversion with an fp8 T5 file, and generate with two LoRAs in different layouts.
# Usage: tools/gpu_interop.sh [ARCH] [OUT]   (ARCH: sd3-medium | sd3.5-medium | sd3.5-large; default sd3-medium)
# Writes OUT/interop-ARCH.json: seconds, peak GPU GiB (torch allocator) and peak host RSS GiB of each step.
# Disk: the random model (~16 GB for sd3-medium), a tuned transformer copy, a single file without T5 plus an
# fp8 T5 file, and their converted folder: about 45 GB for sd3-medium.
set -euo pipefail
arch=${1:-sd3-medium}; out=${2:-interop-out}
model=.models/$arch; tuned=.models/$arch-tuned
mkdir -p "$out"
export SD3BOOTH_MODEL_CACHE=$PWD/.models/single-file
if [ ! -f $model/model_index.json ]; then python3 -m sd3booth random-model $model --arch $arch; fi
if [ ! -f $tuned/model_index.json ]; then  # another seed: every weight differs (full-rank differences)
  python3 -m sd3booth random-model $tuned --arch $arch --seed 1
  rm -rf $tuned/text_encoder $tuned/text_encoder_2 $tuned/text_encoder_3  # extract reads the transformer only
fi
python3 - "$arch" "$model" "$tuned" "$out" <<'EOF'
import json, resource, sys, time
from pathlib import Path
import torch
from sd3booth.cli import main

arch, model, tuned, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
results = {"arch": arch, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

def step(name, fn):
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    value = fn()
    results[name] = {"seconds": round(time.perf_counter() - t, 2),
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                     "host_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                     "result": value}
    print(name, results[name], flush=True)
    (out / f"interop-{arch}.json").write_text(json.dumps(results, indent=2))

lora = out / "extract.safetensors"
step("extract_rank16_all_linear", lambda: main(["lora", "extract", "--base", str(model), "--tuned", str(tuned),
     "--rank", "16", "--lora_layers", "all", "--device", "cuda", "-o", str(lora)]))
step("resize_energy_0.9", lambda: main(["lora", "resize", str(lora), "--energy", "0.9", "-o", str(out / "r.safetensors")]))
step("convert_kohya", lambda: main(["lora", "convert", str(lora), str(out / "k.safetensors"), "--to", "kohya"]))

from sd3booth.single_file_writer import write_encoder_file, write_single_file
sf = out / "single.safetensors"; t5 = out / "t5xxl_fp8_e4m3fn.safetensors"
step("write_single_file_and_fp8_t5", lambda: [str(write_single_file(model, sf, encoders=("clip_l", "clip_g"))),
                                             str(write_encoder_file(model, "t5xxl", t5, fp8=True))])
from sd3booth.models.source import quiet_libraries, resolve_model
quiet_libraries()
step("single_file_convert_once", lambda: str(resolve_model(str(sf), t5xxl=str(t5), single_file_config=str(model)).root))
step("single_file_found_again", lambda: str(resolve_model(str(sf), t5xxl=str(t5), single_file_config=str(model)).root))
step("generate_two_loras_1024", lambda: main(["generate", "--pretrained_model_name_or_path", str(sf), "--t5xxl", str(t5),
     "--single_file_config", str(model), "--lora", f"{out / 'k.safetensors'}:0.5", "--lora", f"{lora}:0.3",
     "--prompt", "a photo", "--num_images", "1", "--num_inference_steps", "4", "--resolution", "1024",
     "--output_dir", str(out / "gen")]))
EOF
