#!/usr/bin/env bash
# Cost of each training method of issue #12 beside plain LoRA + AdamW, in one call on one GPU: every adapter type,
# the text-encoder LoRA, EMA (gpu and cpu), every optimizer, the base-model prior and the Huber loss, each a whole
# `sd3booth train` run of STEPS steps on a random true-size model at 1024 px, batch 1, rank 16, eager blocks
# (--no-compile: compilation would dominate 20 steps) and --max_vram 40 (no memory saver needed, so every run gets
# the same plan and the difference is the method's own).
# Writes OUT/methods.json: per run the peak torch.cuda.max_memory_allocated (training stage and whole run), the
# peak GPU memory of the process seen by NVML (pynvml, else nvidia-smi, sampled every 100 ms), the median s/step
# of steps 6..STEPS, the plan chosen and the planner's predicted training peak.
# Usage (repo root, wheels installed, PYTHONPATH=src): tools/gpu_methods.sh OUT [ARCH] [STEPS] [RUN,RUN,...]
set -euo pipefail
out=${1:-/tmp/methods}; arch=${2:-sd3-medium}; steps=${3:-20}; only=${4:-}
model=.models/$arch
mkdir -p "$out"
[ -f $model/model_index.json ] || python3 -m sd3booth random-model $model --arch $arch
python3 -c "from pathlib import Path; from sd3booth.data.dataset import write_demo_like_dataset as w; w(Path('/tmp/photos'), n=4, size=1024)"
python3 - "$out" "$model" "$steps" "$only" <<'PY'
import json, os, statistics, subprocess, sys, threading, time
out, model, steps, only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
RUNS = {
    "lora_adamw": [],
    "dora": ["--lora_type", "dora"],
    "loha": ["--lora_type", "loha"],
    "lokr": ["--lora_type", "lokr", "--lokr_factor", "16"],
    "text_encoder_lora": ["--train_text_encoder"],
    "ema_gpu": ["--use_ema", "--ema_device", "gpu"],
    "ema_cpu": ["--use_ema", "--ema_device", "cpu"],
    "adamw8bit": ["--optimizer", "adamw8bit"],
    "prodigy": ["--optimizer", "prodigy", "--learning_rate", "1.0"],
    "lion": ["--optimizer", "lion", "--learning_rate", "3e-5"],
    "lion8bit": ["--optimizer", "lion8bit", "--learning_rate", "3e-5"],
    "adafactor": ["--optimizer", "adafactor"],
    "adamw_schedulefree": ["--optimizer", "adamw_schedulefree"],
    "stableadamw": ["--optimizer", "stableadamw"],
    "base_model_prior": ["--with_prior_preservation", "--prior_preservation_mode", "base_model",
                         "--class_prompt", "a photo of a toy"],
    "huber_loss": ["--loss_type", "huber"],
}
if only:
    RUNS = {k: v for k, v in RUNS.items() if k in only.split(",")}

def nvml_sampler(pid, stop, peak):
    """Peak GPU memory (GiB) of the process tree rooted at pid, every 100 ms (NVML, else nvidia-smi)."""
    def tree():
        pids, todo = {pid}, [pid]
        while todo:
            p = todo.pop()
            try:
                kids = open(f"/proc/{p}/task/{p}/children").read().split()
            except OSError:
                kids = []
            for k in map(int, kids):
                pids.add(k); todo.append(k)
        return pids
    try:
        import pynvml
        pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
        read = lambda: {p.pid: p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
    except Exception:
        def read():
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            return {int(a): int(b) * 2**20 for a, b in (l.split(",") for l in r.stdout.strip().splitlines() if l)}
    while not stop.is_set():
        try:
            used = read(); mine = tree()
            peak[0] = max(peak[0], sum(v for p, v in used.items() if p in mine) / 2**30)
        except Exception:
            pass
        time.sleep(0.1)

results = {"arch": os.path.basename(model), "steps": steps, "resolution": 1024, "batch": 1, "rank": 16, "runs": {}}
import torch
results["device"] = torch.cuda.get_device_name(0)
for name, extra in RUNS.items():
    run_dir = f"{out}/{name}"
    cmd = [sys.executable, "-m", "sd3booth", "train", "--pretrained_model_name_or_path", model,
           "--instance_data_dir", "/tmp/photos", "--instance_prompt", "a photo of sks toy", "--output_dir", run_dir,
           "--overwrite_output_dir", "--cache_dir", f"{out}/cache", "--resolution", "1024", "--train_batch_size", "1",
           "--max_train_steps", str(steps), "--logging_steps", "1", "--rank", "16", "--seed", "0",
           "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--report_to", "none", "--checkpointing_steps", "100000",
           "--max_vram", "40", "--no-compile", *extra]
    stop, peak = threading.Event(), [0.0]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=nvml_sampler, args=(proc.pid, stop, peak), daemon=True); sampler.start()
    log = proc.communicate()[0]
    stop.set(); sampler.join()
    entry = {"flags": extra, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode == 0:
        metrics = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl")]
        stages = {s["stage"]: s for s in json.load(open(f"{run_dir}/stages.json"))}
        plan = json.load(open(f"{run_dir}/plan.json"))
        tail = [m["s_per_step"] for m in metrics if m["step"] > 5]
        entry.update(
            median_s_per_step=round(statistics.median(tail), 4),
            peak_allocated_training_gib=round(stages["training"].get("peak_allocated_gib", 0.0), 3),
            peak_allocated_run_gib=round(max(s.get("peak_allocated_gib", 0.0) for s in stages.values()), 3),
            nvml_process_peak_gib=round(peak[0], 3),
            predicted_training_gib=plan["predicted"].get("training"),
            plan={k: plan[k] for k in ("base", "checkpoint_blocks", "swap_blocks", "t5", "compiled")},
        )
    else:
        entry["log_tail"] = log[-3000:]
    results["runs"][name] = entry
    print(name, {k: v for k, v in entry.items() if k not in ("log_tail", "plan", "flags")}, flush=True)
    json.dump(results, open(f"{out}/methods.json", "w"), indent=2)
base = results["runs"].get("lora_adamw", {})
for name, e in results["runs"].items():
    if base.get("median_s_per_step") and e.get("median_s_per_step"):
        e["vs_lora_adamw"] = {"s_per_step": round(e["median_s_per_step"] / base["median_s_per_step"], 3),
                              "peak_training_gib": round(e["peak_allocated_training_gib"]
                                                         - base["peak_allocated_training_gib"], 3)}
json.dump(results, open(f"{out}/methods.json", "w"), indent=2)
print(f"wrote {out}/methods.json")
PY
