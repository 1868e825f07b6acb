"""``bench --reference_script``, ``--parts reference/whole/coldstart`` on the CPU: a fake of diffusers'
``train_dreambooth_lora_sd3.py`` (the real one runs on the GPU) that parses the flags the bench passes, opens
every file of its photo folder as the real one does, and logs its loss through accelerate's TensorBoard tracker
with chosen wall times; our own runs are the real ``sd3booth train`` on the tiny model."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from cli_helpers import run_cli

from sd3booth.bench import reference, runs
from sd3booth.bench.report import markdown_speed
from sd3booth.errors import UserError

FIRST_S, STEP_S, CHECKPOINT_S = 2.0, 0.25, 3.0

FAKE = textwrap.dedent(
    f'''
    """A stand-in for diffusers' train_dreambooth_lora_sd3.py: its flags, its photo reading, its tracker."""
    import argparse, os, sys, time
    from pathlib import Path

    p = argparse.ArgumentParser()
    for flag in ("--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--output_dir"):
        p.add_argument(flag, required=True)
    for flag in ("--resolution", "--train_batch_size", "--rank", "--max_sequence_length", "--max_train_steps",
                 "--checkpointing_steps", "--lr_warmup_steps", "--seed", "--dataloader_num_workers",
                 "--num_validation_images", "--validation_epochs"):
        p.add_argument(flag, type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    for flag in ("--optimizer", "--lr_scheduler", "--report_to", "--validation_prompt"):
        p.add_argument(flag)
    p.add_argument("--logging_dir", default="logs")
    for flag in ("--cache_latents", "--gradient_checkpointing", "--use_8bit_adam"):
        p.add_argument(flag, action="store_true")
    args = p.parse_args()
    if os.environ.get("FAKE_REFERENCE_MISSING"):
        raise ModuleNotFoundError("No module named 'torchvision'")
    from PIL import Image

    images = [Image.open(path) for path in Path(args.instance_data_dir).iterdir()]  # every file, as the script
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    acc = Accelerator(log_with=args.report_to, project_config=ProjectConfiguration(
        project_dir=str(out), logging_dir=str(out / args.logging_dir)))
    acc.init_trackers("dreambooth-sd3-lora", config=vars(args))
    start = time.time()
    for step in range(1, args.max_train_steps + 1):
        wall = start + {FIRST_S} + (step - 1) * {STEP_S} + (step == args.checkpointing_steps) * {CHECKPOINT_S}
        acc.log({{"loss": 1.0 / step, "lr": args.learning_rate}}, step=step,
                log_kwargs={{"tensorboard": {{"walltime": wall}}}})
    acc.end_training()
    (out / "fake.json").write_text(__import__("json").dumps(vars(args)))
    '''
)


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "train_dreambooth_lora_sd3.py"
    path.write_text(FAKE)
    return path


def test_step_seconds_is_the_median_after_the_warm_up():
    points = [(1, 10.0), (2, 10.9), (3, 11.0), (4, 11.2), (5, 11.4), (6, 11.6), (7, 15.0), (8, 15.2)]
    assert reference.step_seconds(points) == pytest.approx(0.2)  # the save at step 7 does not count
    gaps = [(4, 0.0), (6, 1.0), (8, 2.0), (8, 2.5), (9, 3.0)]  # a gap of two steps, step 8 logged twice
    assert reference.step_seconds(gaps) == pytest.approx(0.5)
    assert reference.first_step_seconds(9.0, points) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too few"):
        reference.step_seconds(points[:4])


def test_reference_run_is_timed_from_its_tensorboard_events(fake_script, tiny_model, tmp_path):
    from sd3booth.data.dataset import write_demo_like_dataset

    photos = tmp_path / "photos"
    write_demo_like_dataset(photos, n=2, size=64)  # with metadata.jsonl, which the script would open as an image
    run = tmp_path / "ref"
    row = reference.run_reference(fake_script, tiny_model, photos, run, 64, 8, "a photo of sks toy", False)
    assert row["s_per_step"] == pytest.approx(STEP_S, abs=1e-3)
    assert row["first_step_s"] == pytest.approx(FIRST_S, abs=0.5)  # from the trackers' start
    assert row["stack"] == reference.LABEL and row["measured"] == "run" and row["wall_s"] > 0
    args = json.loads((run / "fake.json").read_text())
    chosen = (args["mixed_precision"], args["optimizer"], args["rank"], args["train_batch_size"])
    assert chosen == ("bf16", "AdamW", 16, 1)
    assert not args["cache_latents"] and not args["gradient_checkpointing"] and not args["use_8bit_adam"]
    assert args["validation_prompt"] is None and args["max_train_steps"] == 8
    cmd = reference.reference_command(fake_script, tiny_model, photos, run, 64, 8, "p", True)
    assert cmd[:2] == [sys.executable, str(fake_script)]  # one process, no accelerate launch
    assert cmd[cmd.index("--num_validation_images") + 1] == "1" and "--validation_prompt" in cmd


def test_reference_failures_are_one_line(fake_script, tiny_model, tmp_path, monkeypatch, capsys):
    from sd3booth.data.dataset import write_demo_like_dataset

    photos = tmp_path / "photos"
    write_demo_like_dataset(photos, n=1, size=64)
    monkeypatch.setenv("FAKE_REFERENCE_MISSING", "1")
    with pytest.raises(UserError, match=r"failed \(exit 1\): ModuleNotFoundError: .*torchvision.* needs torchvision"):
        reference.run_reference(fake_script, tiny_model, photos, tmp_path / "ref", 64, 8, "p", False)
    rc, _, err = run_cli(["bench", "--parts", "reference"], capsys)
    assert (
        rc == 2
        and err.strip() == "error: bench --parts reference times diffusers' script: pass --reference_script PATH"
    )
    rc, _, err = run_cli(["bench", "--parts", "whole", "--reference_script", str(tmp_path / "nope.py")], capsys)
    assert rc == 2 and "nope.py: no such file" in err and len(err.strip().splitlines()) == 1
    from sd3booth.cli import build_parser

    help_text = " ".join(build_parser()[1]["bench"].format_help().split())
    assert "it needs torchvision (the build matching torch) and tensorboard" in help_text


def test_reference_part_beside_our_runs(fake_script, tiny_model, tmp_path):
    """The script, our default plan and --max_vram 3 (on the CPU bench.capped runs it uncapped: a dry run) in one
    speed table with the targets' ratios; the cold/warm rows read the first compiled step's record."""
    res = runs.bench_reference(fake_script, tiny_model, tmp_path, 64, 8, log=lambda _: None)
    ref, ours, small = res["rows"]
    assert ref["s_per_step"] == pytest.approx(STEP_S, abs=1e-3)
    assert ours["stack"] == runs.ours_label(None) and ours["s_per_step"] > 0 and ours["checkpointing"] == "none"
    assert ours["plan"]["checkpoint_blocks"] == 0 and not ours["plan"]["compiled"]  # the CPU's plan, kept
    assert small["s_per_step"] > 0 and small["stack"] == runs.ours_label(3.0)
    assert res["ratios"] == {"default_vs_reference": round(ours["s_per_step"] / ref["s_per_step"], 3),
                             "small_vs_default": round(small["s_per_step"] / ours["s_per_step"], 3)}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "photos-only").iterdir()) == [f"toy_0{i}.png" for i in range(4)]
    md = "\n".join(markdown_speed({"rows": res["rows"], "ratios": res["ratios"]}))
    assert f"| {reference.LABEL} | 1 | none | 0.250 | - | 2.0 | - |  |" in md
    assert "GPU whole process GiB" in md and f"| {runs.ours_label(3.0)} | 1 |" in md
    assert f"ours --max_vram 3 / ours default {res['ratios']['small_vs_default']:.2f}×" in md
    assert f"s/step {res['ratios']['default_vs_reference']:.2f}× (target ≤ 0.40×: " in md

    # a compiled run's first step records the compile caches' counts (metrics.jsonl, see train/loop.py)
    metrics = tmp_path / "ours-default" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    counts = {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 4, "autograd_cache_miss": 2}
    metrics.write_text("\n".join([json.dumps({**json.loads(lines[0]), "compile_cache": counts}), *lines[1:]]) + "\n")
    done = type("Done", (), {"returncode": 0, "stderr": ""})
    cold = runs.our_row(runs.ours_label(None, ", compile cache cold"), done, 1.0, 2.0, 3.0, tmp_path / "ours-default",
                        8)  # fmt: skip
    first = round(json.loads(lines[0])["s_per_step"], 2)  # step 1 logged alone (as every step here)
    assert cold["compile_cache"] == counts and cold["first_step_s"] == first
    whole = {"steps": 10, "reference_s": 100.0, "ours_s": 40.0, "whole_vs_reference": 0.4}
    md = "\n".join(markdown_speed({"rows": [cold], "whole_run": whole}))
    assert f"compile cache cold: {first:.1f} s (FX graphs: 4 compiled, 0 loaded)" in md
    assert "diffusers script 100.0 s, ours 40.0 s: 0.40× (target ≤ 0.50×: met)" in md
