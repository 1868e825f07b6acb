"""The budget is the card (issue #10): whole-process GPU accounting, the host-RAM planner, the fp16 (T4) plan,
the bad-step guard and the out-of-memory line — on the CPU, with the GPU's capabilities injected."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sd3booth.cli import main
from sd3booth.config import DEFAULT_LORA_LAYERS
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import UserError
from sd3booth.models.placement import DeviceInfo, decide
from sd3booth.plan.budget import STAGING_BYTES, Limits, allocator_cap, host_stages, process_overhead
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.choose import Plan, Workload, choose, predict
from sd3booth.plan.sizes import ModelSizes
from sd3booth.train.guard import StepGuard

N = 24
SD3M = ModelSizes(
    n_blocks=N, block_params=82_000_000, other_params=2_030_000_000 - N * 82_000_000, hidden=1536,
    clip_l_params=124_000_000, clip_g_params=695_000_000, t5_params=4_760_000_000, t5_layer_params=193_000_000,
    vae_params=84_000_000, t5_wo_params=24 * 4096 * 10240,
    file_bytes={"text_encoder_2": 1_390_000_000, "text_encoder_3": 9_520_000_000, "transformer": 4_170_000_000},
)  # fmt: skip  # the published SD3 Medium's files
GIB = 2**30


def work(**kw) -> Workload:
    base = dict(resolution=1024, batch=1, t5_len=77, rank=16, optimizer="adamw8bit", validation=True,
                class_images=False, lora_params=N * len(DEFAULT_LORA_LAYERS) * 2 * 16 * 1536)  # fmt: skip
    return Workload(**{**base, **kw})


@pytest.fixture(scope="module")
def cal():
    return load_calibration()


# ---- whole-process GPU accounting ---------------------------------------------------------------------------


def test_allocator_gets_the_budget_less_the_measured_overhead(cal):
    calibrated = cal["process"]["runtime_overhead_gib"]
    extra = cal["process"]["compiled_extra_gib"]
    assert process_overhead(False, 0.0, cal) == calibrated  # nothing measured: the calibrated value
    assert process_overhead(False, 0.9, cal) == 0.9  # measured on this card at start-up
    assert process_overhead(True, 0.9, cal) == pytest.approx(0.9 + extra)  # compiled kernels on top
    assert allocator_cap(Limits(3.0, overhead_gib=0.9), True, cal) == pytest.approx(3.0 - 0.9 - extra)
    p = choose(SD3M, work(), Limits(3.0, overhead_gib=0.9), cal)
    # what nvidia-smi will show is bounded by the cap (the run enforces it) plus the overhead: the budget
    assert p.peak <= p.allocator_cap_gib * cal["safety"]
    assert p.allocator_cap_gib + process_overhead(p.compiled, 0.9, cal) == pytest.approx(3.0)


def test_a_bigger_overhead_gives_a_more_frugal_plan(cal):
    small = choose(SD3M, work(), Limits(4.0, overhead_gib=0.3), cal)
    big = choose(SD3M, work(), Limits(4.0, overhead_gib=1.3), cal)
    assert big.peak < small.peak and big.predicted_s_per_step >= small.predicted_s_per_step


# ---- host RAM -----------------------------------------------------------------------------------------------


def test_host_stages_count_what_stays_in_host_memory(cal):
    resident = host_stages(Plan(t5="bf16"), SD3M, 77, True, cal)
    streamed = host_stages(Plan(t5="stream"), SD3M, 77, True, cal)
    int8 = host_stages(Plan(t5="int8"), SD3M, 77, True, cal)
    h = cal["host"]
    base = h["process_gib"] + h["cuda_libs_gib"]
    staging = STAGING_BYTES / GIB
    # a streamed T5 keeps its bf16 weights (9.5 GB) in host memory all run; a resident one is read through the
    # staging buffer (models.reader), never mapped; bitsandbytes' int8 path still maps its files while loading
    assert resident["T5"] == pytest.approx(base + staging, abs=0.01)
    assert streamed["T5"] == pytest.approx(base + 4_760_000_000 * 2 / GIB + 77 * h["t5_act_per_token_gib"], abs=0.01)
    assert int8["T5"] == pytest.approx(base + 9_520_000_000 / GIB, abs=0.01)
    assert resident["CLIP-G"] == pytest.approx(base + staging, abs=0.01)  # its 1.39 GB file is not mapped either
    assert resident["training"] == pytest.approx(base + h["training_extra_gib"], abs=0.01)
    swapped = host_stages(Plan(checkpoint_blocks=N, swap_blocks=N), SD3M, 77, True, cal)
    pinned = N * SD3M.block_params * 2 / GIB  # every block's frozen weights, exact bytes (no power-of-two rounding)
    # the swapped blocks are read from the file straight into their pinned copies: pinned + staging, not file + pinned
    # plus what page-locked packs cost beyond their bytes (fitted per GiB of them)
    packs = pinned * (1 + h["pinned_overhead_per_gib"])
    assert swapped["training"] == pytest.approx(base + packs + max(staging, h["training_extra_gib"]), abs=0.01)
    fp8 = host_stages(Plan(checkpoint_blocks=N, swap_blocks=N, swap_dtype="fp8"), SD3M, 77, True, cal)
    assert fp8["training"] - base == pytest.approx((swapped["training"] - base) - packs / 2, abs=0.01)  # half
    nf4 = host_stages(Plan(base="nf4", checkpoint_blocks=N), SD3M, 77, True, cal)  # bitsandbytes maps the file
    assert nf4["training"] == pytest.approx(base + 4_170_000_000 / GIB, abs=0.01)
    eager = host_stages(Plan(checkpoint_blocks=N, swap_blocks=N), SD3M, 77, True, cal)
    compiled = host_stages(Plan(checkpoint_blocks=N, swap_blocks=N, compiled=True), SD3M, 77, True, cal)
    workers = h["compile_worker_gib"] * h["compile_workers"]
    assert compiled["training"] - eager["training"] == pytest.approx(workers, abs=0.01)
    # blocks already in the persistent compile cache: the first step loads them, the workers stay idle
    cached = host_stages(Plan(checkpoint_blocks=N, swap_blocks=N, compiled=True), SD3M, 77, True, cal, True, True)
    assert cached == eager


def test_ram_budget_steers_the_plan_and_names_itself_when_too_small(cal):
    # a 6 GiB card cannot hold a bf16 T5: with RAM to spare it is streamed from host memory (full fidelity);
    # with 8 GiB of RAM it is quantised on the card instead
    roomy = choose(SD3M, work(), Limits(6.0, ram_gib=64.0), cal)
    assert roomy.t5 == "stream" and roomy.host_peak > 9
    # the transformer's loading is what a tighter RAM budget steers when T5 is not in the way (--t5 none)
    no_t5 = {"t5": "none"}
    free = choose(SD3M, work(), Limits(3.0, ram_gib=64.0), cal, no_t5)
    capped = choose(SD3M, work(), Limits(3.0, ram_gib=free.host_peak - 0.3), cal, no_t5)
    assert capped.host_peak <= free.host_peak - 0.3 and capped != free
    # on a 3 GiB card only a streamed or CPU T5 fits, both of which need its 9 GB in host memory
    with pytest.raises(UserError, match=r"--max_ram 8 GiB is below .* host memory"):
        choose(SD3M, work(), Limits(3.0, ram_gib=8.0), cal)


def test_fp8_host_copies_only_when_bf16_copies_do_not_fit_the_ram(cal):
    fixed = {"t5": "none", "base": "bf16", "swap_blocks": N, "checkpoint_blocks": N, "compiled": False}
    roomy = choose(SD3M, work(), Limits(80.0, ram_gib=64.0), cal, fixed)
    assert roomy.swap_dtype == "bf16" and "quantised" not in roomy.describe()
    fp8 = predict(dataclasses.replace(roomy, swap_dtype="fp8"), SD3M, work(), cal)
    packs = N * SD3M.block_params * 2 / GIB * (1 + cal["host"]["pinned_overhead_per_gib"])
    assert fp8.host_peak == pytest.approx(roomy.host_peak - packs / 2, abs=0.01)
    assert fp8.predicted["training"] > roomy.predicted["training"]  # the e4m3 staging buffer on the card
    tight = choose(SD3M, work(), Limits(80.0, ram_gib=roomy.host_peak - 0.5), cal, fixed)
    assert tight.swap_dtype == "fp8" and tight.host_peak <= roomy.host_peak - 0.5
    assert "frozen base of the swapped blocks is quantised" in tight.describe()
    asked = choose(SD3M, work(), Limits(80.0, ram_gib=64.0), cal, {**fixed, "swap_dtype": "fp8"})
    assert asked.swap_dtype == "fp8"
    # the planner's own choice: with RAM to spare no plan quantises the swapped blocks' copies
    assert choose(SD3M, work(), Limits(3.0, ram_gib=64.0), cal).swap_dtype == "bf16"
    with pytest.raises(UserError, match="--swap_dtype fp8 quantises a bf16 base"):
        choose(
            SD3M,
            work(),
            Limits(80.0),
            cal,
            {"base": "fp8", "swap_dtype": "fp8", "swap_blocks": 2, "checkpoint_blocks": N},
        )


def test_t4_profile_fits_sd3_medium_at_1024(cal):
    """A free Colab T4: 15 GB card (14.6 GiB free), no bf16, 12.7 GB of RAM (about 11 GiB available)."""
    t4 = Limits(vram_gib=14.6 - 0.5, ram_gib=11.0 - 1.0, overhead_gib=0.45, bf16=False)
    p = choose(SD3M, work(bf16=False), t4, cal)
    assert p.peak <= p.allocator_cap_gib * cal["safety"] and p.host_peak <= 10.0
    bf16 = choose(SD3M, work(), dataclasses.replace(t4, bf16=True), cal)
    if p.t5 == bf16.t5 == "bf16":  # fp16 T5 keeps its wo layers in fp32: a bigger T5 stage
        assert p.predicted["T5"] > bf16.predicted["T5"]


# ---- the fp16 path and its guard ----------------------------------------------------------------------------


def test_a_card_without_bf16_gets_the_fp16_plan():
    t4 = DeviceInfo(type="cuda", total_gib=14.6, bf16=False, name="simulated T4")
    place = decide(t4, None, Plan(t5="bf16"))
    assert (place.mixed_precision, place.weight_dtype, place.vae_dtype) == ("fp16", torch.float16, torch.float32)
    assert place.t5_dtype == torch.float16  # transformers keeps T5's wo layers in fp32 in fp16
    h100 = decide(DeviceInfo(type="cuda", total_gib=79.0, bf16=True), None, Plan(t5="bf16"))
    assert h100.t5_dtype == torch.bfloat16


def test_guard_says_once_then_stops_after_consecutive_skips():
    said = []
    g = StepGuard(3, said.append)
    g.after_step(1, True, 32768.0)
    g.after_step(2, False)
    g.after_step(3, True, 16384.0)
    g.after_step(4, True, 8192.0)
    assert len(said) == 1 and "loss scale lowered to 32768" in said[0]
    with pytest.raises(UserError, match="3 steps in a row skipped .* up to step 5"):
        g.after_step(5, True, 4096.0)


def test_guard_non_finite_loss_stops_at_once_without_a_scaler():
    g = StepGuard(20, print)
    g.check_loss(3, float("nan"), scaled=True)  # fp16: a skipped step, counted by after_step
    with pytest.raises(UserError, match="loss became nan by step 4"):
        g.check_loss(4, float("nan"), scaled=False)


def _run_args(tiny_model, tmp_path, *extra):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    return ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--train_batch_size", "1",
            "--report_to", "none", "--center_crop", *extra]  # fmt: skip


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_model, tmp_path, monkeypatch, capsys):
    from sd3booth.train import loop

    real = loop.flow_matching_loss
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(loop, "flow_matching_loss", poisoned)
    args = _run_args(tiny_model, tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2",
                     "--logging_steps", "1")  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "loss became nan by step 5" in lines[0] and "Traceback" not in err
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts[-1] == "checkpoint-4"  # the last good one, untouched; nothing non-finite was saved
    from safetensors.torch import load_file

    state = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-4" / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_out_of_memory_is_one_line_naming_stage_budget_and_next_budget(tiny_model, tmp_path, monkeypatch, capsys):
    from sd3booth.train import loop

    def oom(run, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "optimizer_step", oom)
    assert main(_run_args(tiny_model, tmp_path, "--max_train_steps", "2")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "out of GPU memory in stage 'training'" in lines[0] and "--max_vram" in lines[0]
    assert "Traceback" not in err
    record = json.loads((tmp_path / "out" / "oom.json").read_text())  # the allocator's state, for a bug report
    assert record["message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert {"allocated_gib", "reserved_gib", "inactive_split_gib", "allocator_settings"} <= set(record)
    assert list((tmp_path / "out" / "cache").rglob("*.safetensors"))  # the caches of the run are kept
    assert not (tmp_path / "out" / "settings.json").exists()  # issue #9: a run that saved nothing writes none


def test_out_of_memory_message_names_the_prediction():
    place = decide(DeviceInfo(type="cuda", total_gib=16, bf16=True), None,
                   Plan(predicted={"T5": 9.1, "training": 5.0}), budget_gib=10.0)  # fmt: skip
    msg = loop_message("text encoder T5 (bf16)", place)
    assert "'text encoder T5 (bf16)'" in msg and "9.10 GiB" in msg and "--max_vram 8.5" in msg and "\n" not in msg


def loop_message(stage, place):
    from sd3booth.train.guard import out_of_memory_message

    return out_of_memory_message(stage, place, explicit=True)


def test_host_rss_is_sampled_from_outside_with_its_parts():
    """The bench's budget rows: a child's resident set and what it is made of (anon: its heap)."""
    import sys

    from sd3booth.bench.budgets import run_sampled

    code = "import time; b = b'x' * (300 * 2**20); time.sleep(0.8)"
    r, _gpu, host, parts = run_sampled([sys.executable, "-c", code], interval=0.05)
    assert r.returncode == 0 and host > 0.29
    assert parts["anon"] > 0.28 and sum(parts.values()) == pytest.approx(host, abs=0.01)


def test_stages_record_host_memory_on_the_cpu(tiny_model, tmp_path):
    assert main(_run_args(tiny_model, tmp_path, "--max_train_steps", "1")) == 0
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    training = next(s for s in stages if s["stage"] == "training")
    assert 0.1 < training["peak_host_rss_gib"] < 64
    # beside the total: what it was made of (/proc's RssAnon + RssFile + RssShmem = VmRSS, at the peak's sample)
    parts = training["peak_host_rss_parts_gib"]
    assert set(parts) == {"anon", "file", "shmem"} and parts["anon"] > 0.05
    assert sum(parts.values()) == pytest.approx(training["peak_host_rss_gib"], abs=0.01)
