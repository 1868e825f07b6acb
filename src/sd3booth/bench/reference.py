"""``bench --reference_script PATH``: diffusers' ``train_dreambooth_lora_sd3.py``, which the user gives (it is
never copied here), run on the bench's model and photos at its own fastest setting on an H100 and timed from
outside like our runs (:func:`sd3booth.bench.budgets.run_sampled`: NVML process GPU memory, host RSS).

Its fastest setting: bf16 mixed precision, torch AdamW, no gradient checkpointing, batch 1, rank 16, one
instance prompt (its prompt embeddings are computed once), one process (``python SCRIPT``; the
script builds its own ``Accelerator``, so ``accelerate launch`` adds nothing on one GPU).

Its s/step comes from the TensorBoard events it writes (``--report_to tensorboard``): it logs the loss at every
step, after ``loss.item()`` has waited for the GPU, so the wall times of consecutive steps are its step times;
their median after the first steps ignores the warm-up and the one step that also saves a checkpoint. Its first
step is timed from the events file's first event, written when the script starts its trackers, right before
the training loop (models loaded, latents and prompt embeddings computed).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd3booth.errors import UserError

# what the script needs besides sd3booth's own dependencies (diffusers' examples/dreambooth/requirements_sd3.txt:
# accelerate, transformers, peft, tensorboard, Jinja2, ftfy, torchvision; only torchvision is not ours)
REQUIREMENTS = "torchvision (the build matching torch) and tensorboard, as diffusers' requirements_sd3.txt lists"
TRACKER = "dreambooth-sd3-lora"  # the script's init_trackers name: its events go to OUTPUT_DIR/logs/TRACKER
SKIP_STEPS = 3  # the first steps (allocator growth, cuDNN plans) are not its steady speed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LABEL = "diffusers script (bf16, AdamW, no ckpt)"


def check_script(path: str | Path) -> Path:
    """The script's path, or one clear error when there is no such file."""
    script = Path(path).expanduser()
    if not script.is_file():
        raise UserError(f"--reference_script {path}: no such file (give diffusers' train_dreambooth_lora_sd3.py)")
    return script


def image_folder(photos: Path, dest: Path) -> Path:
    """The photos alone in ``dest``: the script opens every file of ``--instance_data_dir`` as an image, so
    ``metadata.jsonl`` must stay out (its captions would not be read anyway: the instance prompt is)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(photos.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not (dest / p.name).exists():
            shutil.copy2(p, dest / p.name)
    return dest


def reference_command(
    script: Path, model_dir: Path, photos: Path, run: Path, resolution: int, steps: int, prompt: str, validate: bool
) -> list[str]:
    """The script's command line for ``steps`` steps at its fastest setting; ``validate``: one image with
    ``prompt`` after the first epoch (the script always validates at epoch 0 when given a prompt) and one at
    the end, the pipeline's default 28 sampling steps."""
    args: dict[str, Any] = {
        "--pretrained_model_name_or_path": model_dir, "--instance_data_dir": photos, "--instance_prompt": prompt,
        "--output_dir": run, "--resolution": resolution, "--train_batch_size": 1, "--rank": 16,
        "--max_sequence_length": 77, "--mixed_precision": "bf16", "--optimizer": "AdamW", "--learning_rate": 1e-4,
        "--lr_scheduler": "constant", "--lr_warmup_steps": 0, "--max_train_steps": steps,
        "--checkpointing_steps": steps, "--report_to": "tensorboard", "--seed": 0, "--dataloader_num_workers": 0,
    }  # fmt: skip
    if validate:
        args.update({"--validation_prompt": prompt, "--num_validation_images": 1, "--validation_epochs": 10**9})
    # no --cache_latents: with --mixed_precision bf16 the script casts the photos to bf16 for its fp32 VAE and stops
    # ("Input type (c10::BFloat16) and bias type (float) should be the same", H100, diffusers 0.42.1, 2026-11-25),
    # so its fastest setting that runs encodes each step's photo with the VAE
    return [sys.executable, str(script), *[str(x) for kv in args.items() for x in kv]]


def read_events(logs: Path) -> tuple[float, list[tuple[int, float]]]:
    """(wall time the trackers started, [(step, wall time)] of each logged loss) from the script's TensorBoard
    events under ``logs`` (the events file that holds the loss; the hparams subfolder holds none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in sorted(logs.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every step
        events.Reload()
        if "loss" in events.Tags().get("scalars", []):
            return events.FirstEventTimestamp(), [(e.step, e.wall_time) for e in events.Scalars("loss")]
    raise UserError(f"the reference script wrote no loss to TensorBoard under {logs} (was --report_to honoured?)")


def step_seconds(points: list[tuple[int, float]], skip: int = SKIP_STEPS) -> float:
    """Median seconds per step between consecutive logged steps after the first ``skip`` (a step logged twice:
    its last time; a gap of several steps counts per step)."""
    last = dict(sorted(points, key=lambda p: p[1]))
    kept = sorted((s, t) for s, t in last.items() if s > skip)
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(kept, kept[1:]) if s1 > s0]
    if not per_step:
        raise ValueError(f"too few logged steps after the first {skip} to time: {sorted(last)}")
    return statistics.median(per_step)


def first_step_seconds(start: float, points: list[tuple[int, float]]) -> float:
    """Seconds from the trackers' start (the training loop's) to the first logged step."""
    first = min(s for s, _ in points)
    return min(t for s, t in points if s == first) - start


def failure_line(stderr: str) -> str:
    """The last line the script wrote to stderr, with what it needs when a module is missing."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1][:300] if lines else "(nothing on stderr)"
    if "ModuleNotFoundError" in last or "ImportError" in last:
        last += f" - the script needs {REQUIREMENTS}"
    return last


def run_reference(
    script: Path, model_dir: Path, photos: Path, run: Path, resolution: int, steps: int, prompt: str,
    validate: bool, log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Runs the script once (a fresh ``run`` folder), sampled from outside; its row for the speed table.
    A failed run is one error line, the script's last line on stderr."""
    from sd3booth.bench.budgets import run_sampled

    shutil.rmtree(run, ignore_errors=True)
    cmd = reference_command(script, model_dir, image_folder(photos, run.parent / "photos-only"), run, resolution,
                            steps, prompt, validate)  # fmt: skip
    t0 = time.perf_counter()
    result, gpu, host, _parts = run_sampled(cmd)
    wall = round(time.perf_counter() - t0, 1)
    if result.returncode != 0:
        raise UserError(f"the reference script failed (exit {result.returncode}): {failure_line(result.stderr)}")
    start, points = read_events(run / "logs")
    row = {
        "stack": LABEL, "batch": 1, "checkpointing": "none", "measured": "run", "steps": steps, "wall_s": wall,
        "s_per_step": round(step_seconds(points), 4), "first_step_s": round(first_step_seconds(start, points), 2),
        "peak_gib": None, "process_gpu_gib": gpu, "host_rss_gib": host,
    }  # fmt: skip
    log(f"reference {row}")
    return row
