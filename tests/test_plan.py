"""The memory planner (plan/) and the calibration fit and report of the bench (bench/fit.py, bench/report.py),
on the CPU in seconds.

Sizes are either read from the tiny random model (checked against torch) or synthetic, mimicking SD3 Medium
(24 blocks, 2.03e9 transformer params, hidden 1536, CLIP-L 124M, CLIP-G 695M, T5-XXL 4.76e9, VAE 84M).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sd3booth.config import DEFAULT_LORA_LAYERS, TrainConfig
from sd3booth.errors import UserError
from sd3booth.plan.budget import Limits, allocator_cap, process_overhead
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.choose import (
    BASE_SPEED_ORDER,
    GIB,
    PLAN_SETTINGS,
    Machine,
    Plan,
    Workload,
    candidates,
    choose,
    default_budget,
    plan_for_config,
    predict,
)
from sd3booth.plan.sizes import ModelSizes, read_sizes

N = 24
SD3M = ModelSizes(
    n_blocks=N,
    block_params=82_000_000,
    other_params=2_030_000_000 - N * 82_000_000,  # 2.03e9 in total
    hidden=1536,
    clip_l_params=124_000_000,
    clip_g_params=695_000_000,
    t5_params=4_760_000_000,
    t5_layer_params=193_000_000,
    vae_params=84_000_000,
)
LORA_PARAMS = N * len(DEFAULT_LORA_LAYERS) * 2 * 16 * SD3M.hidden  # rank 16 on every default target


def work(**kw) -> Workload:
    base = dict(
        resolution=1024,
        batch=1,
        t5_len=77,
        rank=16,
        lora_params=LORA_PARAMS,
        optimizer="adamw8bit",
        validation=True,
        class_images=False,
    )
    return Workload(**{**base, **kw})


@pytest.fixture(scope="module")
def cal():
    return load_calibration()


# ---- 1. read_sizes ----------------------------------------------------------------------------------------


def _numel(named) -> int:
    return sum(t.numel() for _, t in named)


def test_read_sizes_matches_torch(tiny_model):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    sizes = read_sizes(tiny_model)
    tr = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    blocks = [_numel(b.named_parameters()) for b in tr.transformer_blocks]
    params = _numel(tr.named_parameters())
    state = _numel(tr.state_dict().items())  # parameters + persistent buffers (the saved pos_embed)
    pos_embed = tr.pos_embed.pos_embed.numel()
    assert state == params + pos_embed

    assert sizes.n_blocks == len(tr.transformer_blocks) == tr.config.num_layers == 2
    assert sizes.block_params == max(blocks)
    # "other" is everything stored outside the joint blocks: parameters and the pos_embed buffer, which is
    # in the checkpoint and on the GPU as well (memory, not trainable parameters, is what the planner needs)
    assert sizes.other_params == state - sum(blocks) == params - sum(blocks) + pos_embed
    assert sizes.hidden == tr.config.num_attention_heads * tr.config.attention_head_dim == 128
    assert sizes.transformer_params == max(blocks) * len(blocks) + sizes.other_params
    assert sizes.transformer_params >= state  # the largest block times n: conservative

    for sub, field_ in (("text_encoder", "clip_l_params"), ("text_encoder_2", "clip_g_params")):
        enc = CLIPTextModelWithProjection.from_pretrained(tiny_model / sub)
        assert getattr(sizes, field_) == _numel(enc.named_parameters())
    t5 = T5EncoderModel.from_pretrained(tiny_model / "text_encoder_3")
    assert sizes.t5_params == _numel(t5.named_parameters())  # tied embeddings counted once
    per_layer = [
        _numel((n, p) for n, p in t5.named_parameters() if n.startswith(f"encoder.block.{i}."))
        for i in range(t5.config.num_layers)
    ]
    assert min(per_layer) > 0
    assert sizes.t5_layer_params == max(per_layer) == per_layer[0]  # block 0 holds the relative bias
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    assert sizes.vae_params == _numel(vae.named_parameters())


def _copy_headers_only(src: Path, dst: Path, variant: str | None = None) -> None:
    """The folder with every safetensors file cut to its header (no tensor data), configs copied."""
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                head = struct.pack("<Q", n) + fh.read(n)
            out.write_bytes(head)
            if variant:  # a second copy under the variant's name: must not be counted twice
                stem, ext = f.name.split(".", 1)
                (out.parent / f"{stem}.{variant}.{ext}").write_bytes(head)
        else:
            out.write_bytes(f.read_bytes())


def test_read_sizes_reads_headers_only_and_fast(tiny_model, tmp_path):
    full = read_sizes(tiny_model)
    _copy_headers_only(tiny_model, tmp_path / "heads")
    assert read_sizes(tmp_path / "heads") == full  # no tensor bytes needed

    _copy_headers_only(tiny_model, tmp_path / "variant", variant="fp16")
    assert read_sizes(tmp_path / "variant") == full
    assert read_sizes(tmp_path / "variant", "fp16") == full


def test_plan_module_imports_without_torch():
    code = "import sys, sd3booth.plan.choose; assert 'torch' not in sys.modules, 'plan imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- 2. candidates ----------------------------------------------------------------------------------------

SETTINGS = PLAN_SETTINGS
assert SETTINGS == ("base", "checkpoint_blocks", "swap_blocks", "activation_offload", "t5", "text_batch",
                    "vae_tiling", "compiled", "cuda_graphs", "swap_dtype")  # fmt: skip


def _settings(p: Plan) -> tuple:
    return tuple(getattr(p, k) for k in SETTINGS)


def _obeys_rules(p: Plan, n: int) -> bool:
    k, s = p.checkpoint_blocks, p.swap_blocks
    return (
        not (p.base == "nf4" and s)
        and s <= k
        and (p.base != "fp8" or k == n)
        and (not p.activation_offload or k > 0)
        and 0 <= k <= n
        and 0 <= s <= n
        and p.compiled == (p.base == "bf16" and not p.activation_offload)  # unless --compile was given
        and (p.swap_dtype == "bf16" or (p.base == "bf16" and s > 0))  # fp8 host copies: of a bf16 base's swaps
    )


def test_candidates_obey_rules_and_cover_the_grid():
    plans = candidates(SD3M, {})
    assert plans and all(_obeys_rules(p, N) for p in plans)
    assert all(not p.predicted for p in plans)
    keys = [_settings(p) for p in plans]
    assert len(keys) == len(set(keys))
    # every grid point that obeys the rules is a candidate
    grid = itertools.product(
        BASE_SPEED_ORDER, (0, 6, 12, 18, 24), range(0, N + 1, 2), (False, True), (8, 1), (False, True)
    )
    want = {
        (b, k, s, o, tb, v)
        for b, k, s, o, tb, v in grid
        if _obeys_rules(Plan(b, k, s, o, compiled=b == "bf16" and not o), N)
    }
    got = {(p.base, p.checkpoint_blocks, p.swap_blocks, p.activation_offload, p.text_batch, p.vae_tiling)
           for p in plans}  # fmt: skip
    assert got == want
    assert {p.t5 for p in plans} == {"bf16", "int8", "nf4", "stream", "cpu"}
    assert {p.base for p in plans if p.base != "bf16" and p.checkpoint_blocks < N} == {"nf4"}
    assert any(p.base == "fp8" and p.swap_blocks == N for p in plans)
    # fp8 host copies are a candidate for every bf16 plan that swaps, and only those
    fp8 = {_settings(dataclasses.replace(p, swap_dtype="bf16")) for p in plans if p.swap_dtype == "fp8"}
    assert fp8 == {_settings(p) for p in plans if p.base == "bf16" and p.swap_blocks and p.swap_dtype == "bf16"}


@pytest.mark.parametrize(
    "fixed",
    [
        {"base": "nf4", "t5": "cpu"},
        {"checkpoint_blocks": N},
        {"checkpoint_blocks": 5, "swap_blocks": 3},  # off the grid: still honoured
        {"base": "fp8", "vae_tiling": True, "activation_offload": False},
        {"swap_blocks": 10},
        {"compiled": False},
        {"compiled": True, "base": "nf4"},  # the user's word wins over the default rule
    ],
)
def test_candidates_honour_fixed_settings(fixed):
    plans = candidates(SD3M, fixed)
    assert plans
    for p in plans:
        assert all(getattr(p, k) == v for k, v in fixed.items()), p
        assert _obeys_rules(dataclasses.replace(p, compiled=p.base == "bf16" and not p.activation_offload), N)
    if fixed.get("base") == "nf4":
        assert all(p.swap_blocks == 0 for p in plans)
    if fixed.get("base") == "fp8":
        assert all(p.checkpoint_blocks == N for p in plans)
    if fixed.get("swap_blocks") == 10:
        assert {p.checkpoint_blocks for p in plans} == {12, 18, 24}


# ---- 3. predict -------------------------------------------------------------------------------------------


def _train(cal, wl=None, **plan) -> Plan:
    return predict(Plan(**plan), SD3M, wl or work(), cal)


def test_predict_stage_values(cal):
    c, bpp = cal["coefficients"], cal["bytes_per_param"]
    p = _train(cal, checkpoint_blocks=N)
    assert set(p.predicted) == {"CLIP-L", "CLIP-G", "T5", "VAE encode", "training", "validation"}
    assert p.peak == max(p.predicted.values())
    assert p.predicted["CLIP-L"] == pytest.approx(124e6 * 2 / GIB + c["clip_l_act_per8"] + c["fixed"], abs=1e-3)
    assert p.predicted["CLIP-G"] == pytest.approx(695e6 * 2 / GIB + c["clip_g_act_per8"] + c["fixed"], abs=1e-3)
    t5 = 4.76e9 * 2 / GIB + c["t5_act_per8x256"] * 77 / 256 + c["fixed"]
    assert p.predicted["T5"] == pytest.approx(t5, abs=1e-3)
    assert p.predicted["VAE encode"] == pytest.approx(84e6 * 2 / GIB + c["vae_encode_per_mpx"] + c["fixed"], abs=1e-3)
    units = (4096 + 77 + 77) * 1536 / GIB
    resident = 2.03e9 * 2 / GIB
    lora = LORA_PARAMS * (4 + 4 + 2) / GIB
    act = units * (c["act_checkpointed"] * N + c["act_full"])
    assert p.predicted["training"] == pytest.approx(resident + lora + act + c["fixed"], abs=1e-3)
    # the calibration point itself: bf16, full checkpointing, 1024 px, batch 1, 77 + 77 text tokens
    assert p.predicted_s_per_step == pytest.approx(cal["time"]["s_per_step_1024_bf16_full_ckpt"], abs=1e-4)
    nockpt = _train(cal).predicted_s_per_step
    assert nockpt == pytest.approx(p.predicted_s_per_step / (1 + cal["time"]["checkpoint_overhead"]), abs=1e-4)
    nf4 = _train(cal, base="nf4", checkpoint_blocks=N)  # validation holds the weights, no storage extras
    saved = N * SD3M.block_params * (2 - bpp["nf4"]) / GIB
    assert p.predicted["validation"] - nf4.predicted["validation"] == pytest.approx(saved, abs=2e-3)


def test_predict_training_peak_falls_with_checkpointing(cal):
    grid = sorted({p.checkpoint_blocks for p in candidates(SD3M, {})})
    assert grid == [0, 6, 12, 18, 24]
    peaks = [_train(cal, checkpoint_blocks=k).predicted["training"] for k in grid]
    secs = [_train(cal, checkpoint_blocks=k).predicted_s_per_step for k in grid]
    assert all(a > b for a, b in itertools.pairwise(peaks)), peaks
    assert all(a < b for a, b in itertools.pairwise(secs)), secs
    # from one checkpointed block on, each more saves act_full - act_checkpointed per unit; the first one
    # adds the recomputed block's activations (a conservative term), so k=1 alone is not below k=0
    every = [_train(cal, checkpoint_blocks=k).predicted["training"] for k in range(1, N + 1)]
    assert all(a > b for a, b in itertools.pairwise(every)), every
    c = cal["coefficients"]
    step = (4096 + 154) * SD3M.hidden / GIB * (c["act_full"] - c["act_checkpointed"])
    assert every[0] - every[1] == pytest.approx(step, abs=2e-3)
    # offloading the saved activations lowers the peak further and costs time
    off = _train(cal, checkpoint_blocks=N, activation_offload=True)
    assert off.predicted["training"] < peaks[-1]
    assert off.predicted_s_per_step == pytest.approx(secs[-1] * cal["time"]["activation_offload_factor"], abs=1e-4)


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_predict_training_peak_falls_with_swap(cal, base):
    swaps = list(range(0, N + 1, 2))
    plans = [_train(cal, base=base, checkpoint_blocks=N, swap_blocks=s) for s in swaps]
    peaks = [p.predicted["training"] for p in plans]
    secs = [p.predicted_s_per_step for p in plans]
    assert all(a >= b for a, b in itertools.pairwise(peaks)), peaks
    assert all(a > b for a, b in itertools.pairwise(peaks[1:])), peaks  # each 2 more swapped blocks save memory
    assert peaks[-1] < peaks[0] - 10 * SD3M.block_params * cal["bytes_per_param"][base] / GIB
    assert all(a <= b for a, b in itertools.pairwise(secs)), secs
    assert secs[-1] > secs[0]


def test_predict_weight_precision_order(cal):
    p = {b: _train(cal, base=b, checkpoint_blocks=N) for b in ("nf4", "fp8", "bf16")}
    assert p["nf4"].predicted["training"] < p["fp8"].predicted["training"] < p["bf16"].predicted["training"]
    assert p["nf4"].predicted["validation"] < p["fp8"].predicted["validation"] < p["bf16"].predicted["validation"]
    # the text encoders and the VAE do not depend on the transformer's storage
    for stage in ("CLIP-L", "CLIP-G", "T5", "VAE encode"):
        assert p["nf4"].predicted[stage] == p["bf16"].predicted[stage]
    assert p["bf16"].predicted_s_per_step <= p["fp8"].predicted_s_per_step
    assert p["bf16"].predicted_s_per_step <= p["nf4"].predicted_s_per_step


def test_predict_t5_modes(cal):
    t5 = {m: _train(cal, t5=m).predicted.get("T5") for m in ("bf16", "int8", "nf4", "stream", "cpu")}
    assert t5["cpu"] is None
    assert "T5" not in _train(cal, t5="none").predicted
    assert t5["stream"] < t5["nf4"] < t5["int8"] < t5["bf16"]
    # a batch of 1 caption needs less than 8
    assert _train(cal, t5="bf16", text_batch=1).predicted["T5"] < t5["bf16"]
    assert _train(cal, text_batch=1).predicted["CLIP-G"] < _train(cal).predicted["CLIP-G"]


def test_predict_vae_tiling_and_optional_stages(cal):
    wl = work(class_images=True)
    whole = _train(cal, wl)
    tiled = _train(cal, wl, vae_tiling=True)
    assert set(whole.predicted) == {"CLIP-L", "CLIP-G", "T5", "VAE encode", "class images", "training", "validation"}
    assert tiled.predicted["VAE encode"] < whole.predicted["VAE encode"]
    assert tiled.predicted["class images"] < whole.predicted["class images"]
    assert tiled.predicted["validation"] <= whole.predicted["validation"]
    assert tiled.predicted["training"] == whole.predicted["training"]
    c = cal["coefficients"]
    assert whole.predicted["VAE encode"] - tiled.predicted["VAE encode"] == pytest.approx(
        c["vae_encode_per_mpx"] * 0.75, abs=2e-3
    )
    # at 512 px an image is already one tile's worth
    small = work(resolution=512)
    assert _train(cal, small, vae_tiling=True).predicted["VAE encode"] == _train(cal, small).predicted["VAE encode"]

    no_val = _train(cal, work(validation=False))
    assert "validation" not in no_val.predicted and "class images" not in no_val.predicted
    assert "validation" in _train(cal).predicted


# ---- 4. choose --------------------------------------------------------------------------------------------


def test_choose_fits_budget_and_gets_faster(cal):
    budgets = [3, 4, 6, 8, 12, 16]
    chosen = [choose(SD3M, work(), b, cal) for b in budgets]
    for b, p in zip(budgets, chosen):
        # the allocator gets the budget less what the process holds outside it (context, workspaces, kernels)
        assert p.allocator_cap_gib == pytest.approx(b - process_overhead(p.compiled, 0.0, cal), abs=1e-3)
        assert p.predicted and p.peak <= p.allocator_cap_gib * cal["safety"], (b, p)
        assert _obeys_rules(p, N)
        again = predict(dataclasses.replace(p, predicted={}), SD3M, work(), cal)
        assert again.predicted == p.predicted
    secs = [p.predicted_s_per_step for p in chosen]
    assert all(a >= b for a, b in itertools.pairwise(secs)), secs
    assert secs[0] > secs[-1]
    # with room for everything: the fastest plan of all, compiled, whole images; of the plans of that step
    # time, the lightest on host memory, then the most faithful T5: bf16 on the card (a streamed T5 would
    # keep 9 GB in host memory; int8 and nf4 lose fidelity)
    fastest = min(predict(p, SD3M, work(), cal).predicted_s_per_step for p in candidates(SD3M, {}))
    big = choose(SD3M, work(), 80, cal)
    assert big.predicted_s_per_step == fastest
    assert (big.base, big.checkpoint_blocks, big.swap_blocks, big.t5, big.vae_tiling, big.compiled) == (
        "bf16", 0, 0, "bf16", False, True
    )  # fmt: skip
    same_time = [
        q for p in candidates(SD3M, {}) if (q := predict(p, SD3M, work(), cal)).predicted_s_per_step == fastest
    ]
    assert big.host_peak == min(q.host_peak for q in same_time)
    assert predict(replace_t5(big, "stream"), SD3M, work(), cal).host_peak >= big.host_peak
    # every candidate that fits is no faster than the choice
    for p in candidates(SD3M, {}):
        q = predict(p, SD3M, work(), cal)
        if q.peak <= allocator_cap(Limits(6.0), q.compiled, cal) * cal["safety"]:
            assert q.predicted_s_per_step >= chosen[2].predicted_s_per_step


def replace_t5(p: Plan, t5: str) -> Plan:
    return dataclasses.replace(p, t5=t5, predicted={})


def test_predict_compiled_is_faster_and_saves_activations(cal):
    for k in (0, N // 2, N):
        eager, comp = _train(cal, checkpoint_blocks=k), _train(cal, checkpoint_blocks=k, compiled=True)
        assert comp.predicted["training"] < eager.predicted["training"]
        assert comp.predicted_s_per_step < eager.predicted_s_per_step
        ratio = comp.predicted_s_per_step / eager.predicted_s_per_step
        lo, hi = sorted((cal["time"]["compiled_factor_none"], cal["time"]["compiled_factor_all"]))
        assert lo - 1e-3 <= ratio <= hi + 1e-3
    # the measured fact behind the default: a compiled, uncheckpointed SD3 Medium step needs under 8 GiB
    assert _train(cal, compiled=True).predicted["training"] < 8 < _train(cal).predicted["training"]


def test_default_budget_plan_is_fast_and_under_8_gib(cal):
    p = choose(SD3M, work(), default_budget(80), cal)
    assert (p.checkpoint_blocks, p.swap_blocks, p.compiled, p.t5) == (0, 0, True, "bf16")
    assert p.predicted["training"] < 8
    eager = choose(SD3M, work(), default_budget(80), cal, {"compiled": False})  # --no-compile
    assert eager.checkpoint_blocks == 0 and not eager.compiled
    assert eager.predicted_s_per_step > p.predicted_s_per_step


def test_choose_too_small_budget_names_max_vram(cal):
    with pytest.raises(UserError, match="--max_vram") as e:
        choose(SD3M, work(), 0.5, cal)
    assert "0.5 GiB" in str(e.value) and "1024" in str(e.value)


@pytest.mark.parametrize("fixed", [{"base": "nf4", "t5": "cpu"}, {"checkpoint_blocks": 0}, {"vae_tiling": True}])
def test_choose_respects_fixed(cal, fixed):
    p = choose(SD3M, work(), 8, cal, fixed)
    assert all(getattr(p, k) == v for k, v in fixed.items())
    assert p.peak <= 8 * cal["safety"]


def test_choose_with_t5_none(cal):
    p = choose(SD3M, work(), 16, cal, {"t5": "none"})
    assert p.t5 == "none" and "T5" not in p.predicted


def test_choose_conflicting_fixed_settings_named(cal):
    with pytest.raises(UserError) as e:
        choose(SD3M, work(), 80, cal, {"checkpoint_blocks": 0, "swap_blocks": 4})
    msg = str(e.value)
    assert "?" not in msg and "--blocks_to_swap" in msg and "--checkpoint_blocks" in msg


# ---- 5. plan_for_config ------------------------------------------------------------------------------------


def _cfg(tiny_model, **kw) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path=str(tiny_model), instance_data_dir="x", **kw)


def test_plan_for_config_cpu_uses_fixed_settings_only(tiny_model, cal):
    n = read_sizes(tiny_model).n_blocks
    plan, budget = plan_for_config(_cfg(tiny_model, gradient_checkpointing=True, t5_precision="cpu"), tiny_model, None)
    assert budget == 0.0
    assert _settings(plan) == _settings(Plan(checkpoint_blocks=n, t5="cpu"))
    assert plan.predicted and "T5" not in plan.predicted and plan.predicted_s_per_step > 0

    plan, _ = plan_for_config(_cfg(tiny_model), tiny_model, None)
    assert _settings(plan) == _settings(Plan())  # nothing fixed: the defaults, T5 bf16, not compiled
    plan, _ = plan_for_config(_cfg(tiny_model, compile=True), tiny_model, None)
    assert plan.compiled  # --compile on the CPU is honoured
    plan, _ = plan_for_config(
        _cfg(tiny_model, base_precision="fp8", checkpoint_blocks=1, blocks_to_swap=99, vae_tiling=True),
        tiny_model,
        None,
        cal,
    )
    assert _settings(plan) == _settings(
        Plan(base="fp8", checkpoint_blocks=1, swap_blocks=n, vae_tiling=True)
    )  # swap clipped to n


def test_plan_for_config_gpu_budgets(tiny_model, cal):
    # without --max_vram: what the card had free at start (plus this process's own), less a margin
    assert default_budget(23.6) == pytest.approx(23.1)
    assert default_budget(8) == pytest.approx(7.5)
    assert default_budget(None) == pytest.approx(16e9 / 2**30 - 0.5)  # unknown: a 16 GB card
    card = Machine(gpu_available_gib=23.6, overhead_gib=0.6, bf16=True, ram_available_gib=60.0)
    plan, budget = plan_for_config(_cfg(tiny_model), tiny_model, card)
    assert budget == pytest.approx(23.1)
    # the measured overhead (0.6) and compiled kernels come off the budget before the allocator gets it
    assert plan.allocator_cap_gib == pytest.approx(23.1 - 0.6 - cal["process"]["compiled_extra_gib"], abs=1e-3)
    assert plan.peak <= plan.allocator_cap_gib * cal["safety"]
    assert (plan.base, plan.checkpoint_blocks, plan.swap_blocks) == ("bf16", 0, 0)  # a tiny model fits as is

    plan, budget = plan_for_config(_cfg(tiny_model, max_vram=6), tiny_model, card)
    assert budget == 6 and plan.allocator_cap_gib < 6
    assert plan.peak <= plan.allocator_cap_gib * cal["safety"]

    plan, budget = plan_for_config(_cfg(tiny_model, max_vram=6, t5_precision="int8"), tiny_model, card)
    assert budget == 6 and plan.t5 == "int8"
    with pytest.raises(UserError, match="--max_vram 0.1 GiB .* whole process"):
        plan_for_config(_cfg(tiny_model, max_vram=0.1), tiny_model, card)
    # the overhead alone exceeds a 0.7 GiB budget even though the tiny model's tensors would fit
    with pytest.raises(UserError, match="--max_vram"):
        plan_for_config(_cfg(tiny_model, max_vram=0.7), tiny_model, card)


def test_plan_for_config_gpu_t5_none(tiny_model):
    plan, _ = plan_for_config(_cfg(tiny_model, t5_precision="none"), tiny_model, Machine(24.0))
    assert plan.t5 == "none"


def test_plan_for_config_gpu_compile(tiny_model):
    m = Machine(24.0)
    assert plan_for_config(_cfg(tiny_model), tiny_model, m)[0].compiled  # CUDA + bf16: on by default
    assert not plan_for_config(_cfg(tiny_model, compile=False), tiny_model, m)[0].compiled
    assert not plan_for_config(_cfg(tiny_model, base_precision="nf4"), tiny_model, m)[0].compiled
    assert plan_for_config(_cfg(tiny_model, base_precision="nf4", compile=True), tiny_model, m)[0].compiled


def test_fit_compiled_recovers_coefficients():
    from sd3booth.bench.fit import fit_compiled

    truth = copy.deepcopy(load_calibration())
    truth["coefficients"].update(act_full_compiled=20.0, act_checkpointed_compiled=1.5)
    truth["time"].update(
        compiled_factor_none=0.5, compiled_factor_all=0.4, launch_bound_fraction=0.4, launch_bound_fraction_compiled=0.6
    )
    wl = work(optimizer="adamw", validation=False)
    rows = []
    for k, label in ((0, "none"), (N, "all")):
        for compiled in (False, True):
            p = predict(Plan(checkpoint_blocks=k, compiled=compiled), SD3M, wl, truth)
            rows.append({"stack": "ours compiled" if compiled else "ours eager", "batch": 1, "checkpointing": label,
                         "peak_gib": p.predicted["training"], "s_per_step": p.predicted_s_per_step})  # fmt: skip
    for compiled in (False, True):  # batch 4: time share of 4x the tokens
        p = predict(Plan(compiled=compiled), SD3M, dataclasses.replace(wl, batch=4), truth)
        rows.append({"stack": "ours compiled" if compiled else "ours eager", "batch": 4, "checkpointing": "none",
                     "peak_gib": p.predicted["training"], "s_per_step": p.predicted_s_per_step})  # fmt: skip
    rows.append({"stack": "stock", "batch": 1, "checkpointing": "all", "peak_gib": 9.0, "s_per_step": 1.0})
    start = copy.deepcopy(load_calibration())
    for key in ("act_full_compiled", "act_checkpointed_compiled"):
        start["coefficients"].pop(key)
    fit = fit_compiled(start, {"rows": rows, "device": "Test GPU", "date": "2026-01-01"}, SD3M.hidden, N, wl.tokens)
    assert fit["coefficients"]["act_full_compiled"] == pytest.approx(20.0, abs=0.05)
    assert fit["coefficients"]["act_checkpointed_compiled"] == pytest.approx(1.5, abs=0.05)
    assert fit["time"]["compiled_factor_none"] == pytest.approx(0.5, abs=2e-3)
    assert fit["time"]["compiled_factor_all"] == pytest.approx(0.4, abs=2e-3)
    assert fit["time"]["launch_bound_fraction"] == pytest.approx(0.4, abs=2e-3)
    assert fit["time"]["launch_bound_fraction_compiled"] == pytest.approx(0.6, abs=2e-3)
    assert "Test GPU" in fit["compiled_source"]
    # rows missing: the calibration is returned unchanged
    assert fit_compiled(copy.deepcopy(start), {"rows": rows[:2]}, SD3M.hidden, N, wl.tokens) == start


# ---- 6. fit_calibration ------------------------------------------------------------------------------------

TRUTH_COEF = dict(
    fixed=0.2,
    act_full=30.0,
    act_checkpointed=2.0,
    act_inference=25.0,
    clip_l_act_per8=0.4,
    clip_g_act_per8=1.2,
    t5_act_per8x256=0.5,
    vae_encode_per_mpx=1.5,
    vae_decode_per_mpx=2.5,
    t5_stream_base=0.35,
)
TRUTH_BASE_EXTRA = {"nf4": 0.4, "fp8": 0.6}
TRUTH_BPP = {"nf4": 0.6, "fp8": 1.05, "t5_int8": 1.3, "t5_nf4": 0.95}
TRUTH_TIME = dict(
    s_per_step_1024_bf16_full_ckpt=0.42,
    checkpoint_overhead=1.1,
    h2d_gbps=12.5,  # slow enough that the copy, not the compute, bounds the all-swapped step
    swap_overhead_per_block=0.003,
    activation_offload_factor=1.12,
)
TRUTH_BASE_FACTOR = {"nf4": 1.3, "fp8": 1.05}


def _units(res: int, hidden: int) -> float:
    return ((res // 16) ** 2 + 154) * hidden / GIB


def _truth_calibration() -> dict:
    cal = copy.deepcopy(load_calibration())
    cal["coefficients"].update(TRUTH_COEF)
    cal["coefficients"]["base_extra"] = dict(TRUTH_BASE_EXTRA)
    cal["coefficients"]["base_extra_units"] = _units(1024, SD3M.hidden)
    cal["bytes_per_param"].update(TRUTH_BPP)
    # batch scaling and compiled terms come from `bench --parts speed` (fit_compiled), not from this fit: the
    # truth shares them with the packaged calibration the fit starts from
    cal["time"].update(TRUTH_TIME, calibration_blocks=N)
    cal["time"]["base_factor"].update(TRUTH_BASE_FACTOR)
    return cal


TRAIN_OPTIONS = [
    ("bf16", 0, 0, False, 1024),
    ("bf16", N, 0, False, 1024),
    ("bf16", 0, 0, False, 512),
    ("bf16", N, 0, False, 512),
    ("bf16", N, N, False, 1024),
    ("bf16", N, 0, True, 1024),
    ("nf4", N, 0, False, 1024),
    ("fp8", N, 0, False, 1024),
    ("bf16", N // 2, 0, False, 1024),
]


def _measured(truth: dict) -> dict:
    """What bench_calibrate would record on a GPU that behaves exactly as plan.predict says with `truth`."""
    sz, c, bpp = SD3M, truth["coefficients"], truth["bytes_per_param"]
    train_work = dict(batch=1, rank=16, lora_params=0, optimizer="adamw", validation=False, class_images=False)
    train = []
    for base, k, s, off, res in TRAIN_OPTIONS:
        p = predict(Plan(base=base, checkpoint_blocks=k, swap_blocks=s, activation_offload=off), sz,
                    Workload(resolution=res, t5_len=77, **train_work), truth)  # fmt: skip
        block = sz.block_params * bpp[base] / GIB
        weights = sz.other_params * 2 / GIB + (N - s) * block + (2 * block if s else 0.0)
        row = dict(base=base, checkpoint_blocks=k, swap_blocks=s, activation_offload=off, resolution=res,
                   weights_gib=round(weights, 3), peak_gib=p.predicted["training"], reserved_gib=0.0,
                   s_per_step=p.predicted_s_per_step)  # fmt: skip
        if base == "bf16" and k == 0 and res == 1024:
            row["inference_b2_act_gib"] = round(2 * _units(1024, sz.hidden) * c["act_inference"], 3)
        train.append(row)
    text = Workload(resolution=1024, t5_len=256, **train_work)
    stages = []
    for name in ("CLIP-L", "CLIP-G"):
        stages.append(dict(stage=name, option="bf16 x8", peak_gib=predict(Plan(), sz, text, truth).predicted[name]))
    for mode in ("bf16", "int8", "nf4", "stream"):
        peak = predict(Plan(t5=mode), sz, text, truth).predicted["T5"]
        stages.append(dict(stage="T5", option=f"{mode} x8", peak_gib=peak, seconds=1.0, cosine_vs_bf16=0.99))
    stages.append(dict(stage="T5", option="cpu x2", peak_gib=0.0, seconds=9.0, cosine_vs_bf16=0.9999))
    vae_w = sz.vae_params * 2 / GIB
    for tiled in (False, True):
        option = "tiled" if tiled else "whole"
        enc = predict(Plan(vae_tiling=tiled), sz, text, truth).predicted["VAE encode"]
        dec = vae_w + c["vae_decode_per_mpx"] * (0.25 if tiled else 1.0)
        stages.append(dict(stage="VAE encode", option=option, peak_gib=enc))
        stages.append(dict(stage="VAE decode", option=option, peak_gib=round(dec, 3)))
    return {"sizes": dataclasses.asdict(sz), "stages": stages, "train": train, "h2d_gbps": TRUTH_TIME["h2d_gbps"],
            "device": "Test GPU", "date": "2026-01-01"}  # fmt: skip


def test_fit_calibration_recovers_known_coefficients():
    from sd3booth.bench.fit import fit_calibration

    truth = _truth_calibration()
    measured = _measured(truth)
    seed = load_calibration()
    fitted = fit_calibration(json.loads(json.dumps(measured)), seed)
    assert seed == load_calibration()  # the seed is not modified
    c, bpp, t = fitted["coefficients"], fitted["bytes_per_param"], fitted["time"]
    for key, want in TRUTH_COEF.items():
        assert c[key] == pytest.approx(want, rel=1e-2), key
    for base, want in TRUTH_BASE_EXTRA.items():
        assert c["base_extra"][base] == pytest.approx(want, rel=1e-2), base
    assert c["base_extra_units"] == pytest.approx(_units(1024, SD3M.hidden), rel=1e-3)
    for key, want in TRUTH_BPP.items():
        assert bpp[key] == pytest.approx(want, rel=1e-2), key
    assert bpp["bf16"] == bpp["t5_bf16"] == 2.0
    for key, want in TRUTH_TIME.items():
        assert t[key] == pytest.approx(want, rel=1e-2), key
    for base, want in TRUTH_BASE_FACTOR.items():
        assert t["base_factor"][base] == pytest.approx(want, rel=1e-2), base
    assert t["calibration_blocks"] == N
    assert fitted["safety"] == seed["safety"]
    assert "Test GPU" in fitted["source"] and "2026-01-01" in fitted["source"]
    json.dumps(fitted)  # what run_bench writes


def test_fit_calibration_predicts_like_the_truth():
    """Fit and predict use one formula: the fitted calibration predicts what the measuring GPU showed."""
    from sd3booth.bench.fit import fit_calibration

    truth = _truth_calibration()
    fitted = fit_calibration(_measured(truth), load_calibration())
    plans = candidates(SD3M, {"text_batch": 8})[::7]
    assert len(plans) > 50
    for wl in (work(), work(resolution=768, class_images=True), work(batch=2, t5_len=256)):
        for p in plans:
            a, b = predict(p, SD3M, wl, truth), predict(p, SD3M, wl, fitted)
            assert a.predicted.keys() == b.predicted.keys()
            for stage in a.predicted:
                assert b.predicted[stage] == pytest.approx(a.predicted[stage], rel=1e-2, abs=2e-3), (p, stage)
            assert b.predicted_s_per_step == pytest.approx(a.predicted_s_per_step, rel=1e-2), p


def test_fit_calibration_survives_a_failed_option():
    from sd3booth.bench.fit import fit_calibration

    measured = _measured(_truth_calibration())
    measured["train"] = [
        {k: r[k] for k in ("base", "checkpoint_blocks", "swap_blocks", "activation_offload", "resolution")}
        | {"error": "RuntimeError: bitsandbytes has no CUDA kernels"}
        if r["base"] == "nf4"
        else r
        for r in measured["train"]
    ]
    seed = load_calibration()
    fitted = fit_calibration(measured, seed)
    assert fitted["bytes_per_param"]["nf4"] == seed["bytes_per_param"]["nf4"]  # kept from the seed
    assert fitted["coefficients"]["act_full"] == pytest.approx(TRUTH_COEF["act_full"], rel=1e-2)


# ---- 7. markdown -------------------------------------------------------------------------------------------


def _result() -> dict:
    measured = _measured(_truth_calibration())
    measured["train"][6].update(output_rel_err=0.012, lora_grad_rel_err=0.034)
    return {
        "arch": "sd3-medium",
        "date": "2026-01-01",
        "device": "Test GPU",
        "command": "sd3booth bench --parts stock,calibrate,budgets",
        "versions": {"sd3booth": "0.1", "torch": "2.x"},
        "stock": [
            {"resolution": 512, "weights_gib": 4.1234, "peak_gib": 6.5, "s_per_step": 0.2},
            {"resolution": 1024, "weights_gib": 4.1234, "peak_gib": 9.25, "s_per_step": 0.41234},
        ],
        "calibrate": measured,
        "budgets": [
            {"arch": "sd3-medium", "budget_gib": 6.0, "resolution": 1024, "rc": 0, "wall_s": 60.0,
             "peak_gib": 5.1, "peak_reserved_gib": 5.6, "stages": {"training": 5.1, "T5": None, "VAE encode": 1.7},
             "s_per_step": 0.34, "predicted_peak_gib": 5.4, "predicted_s_per_step": 0.3, "first_step_s": 25.1,
             "plan": {"base": "bf16", "checkpoint_blocks": 18, "swap_blocks": 0, "activation_offload": False,
                      "t5": "stream", "text_batch": 8, "vae_tiling": True, "compiled": True}},
            {"arch": "sd3-medium", "budget_gib": 2.0, "resolution": 1024, "rc": 1, "wall_s": 3.0,
             "error": "UserError: --max_vram 2 GiB is below what this model needs"},
            {"arch": "sd3-medium", "budget_gib": None, "resolution": 1024, "rc": 0, "wall_s": 50.0,
             "peak_gib": 9.0, "peak_reserved_gib": 9.5, "stages": {"training": 9.0}, "s_per_step": 0.25,
             "predicted_peak_gib": 9.07,
             "plan": {"base": "nf4", "checkpoint_blocks": 24, "swap_blocks": 0, "activation_offload": True,
                      "t5": "bf16", "text_batch": 8, "vae_tiling": False}},
        ],
    }  # fmt: skip


def _rows(md: str) -> list[str]:
    return [x for x in md.splitlines() if x.startswith("| ") and not x.startswith("|---")]


def test_markdown_renders_every_row():
    from sd3booth.bench.report import markdown

    result = _result()
    md = markdown(result)
    lines = md.splitlines()
    assert lines[0] == "## sd3-medium — 2026-01-01, Test GPU"
    assert "`sd3booth bench --parts stock,calibrate,budgets`" in lines
    assert "Versions: sd3booth 0.1, torch 2.x" in lines
    assert md.endswith("\n")
    cal = result["calibrate"]
    headers = 4  # stock, train, stage, budget tables
    assert len(_rows(md)) == headers + 2 + len(cal["train"]) + len(cal["stages"]) + 3
    assert "| stock | 512 | 4.12 | 6.50 | 0.200 |" in lines
    assert "| stock | 1024 | 4.12 | 9.25 | 0.412 |" in lines
    train = [x for x in lines if x.startswith(("| bf16, ckpt", "| nf4, ckpt", "| fp8, ckpt"))]
    assert len(train) == len(cal["train"])
    r = cal["train"][6]
    assert (
        f"| nf4, ckpt {N}, swap 0 | 1024 | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} | "
        "0.012 | 0.034 |" in lines
    )
    assert any(x.startswith(f"| bf16, ckpt {N}, swap 0, act. offload | 1024 |") for x in lines)
    assert sum(x.startswith("| T5 | ") for x in lines) == 5
    assert "| T5 | cpu x2 | 0.00 | 9.0 | 0.9999 |" in lines
    assert any(x.startswith("| VAE decode | tiled | ") and x.endswith("|  |  |") for x in lines)
    assert f"Host-to-device copy (pinned): {TRUTH_TIME['h2d_gbps']} GB/s" in lines
    assert (
        "| 6.0 | bf16, ckpt 18, swap 0, T5 stream, VAE tiled, compiled | 5.40 | 5.10 / 5.60 | 0.340 (0.300) | 25.1 | "
        "training 5.10, VAE encode 1.70 |" in lines
    )
    assert "| 2.0 | failed: UserError: --max_vram 2 GiB is below what this model needs | | | | | |" in lines
    assert (
        "| default | nf4, ckpt 24, swap 0, T5 bf16, act. offload | 9.07 | 9.00 / 9.50 | 0.250 |  | training 9.00 |"
        in lines
    )


def test_markdown_optional_parts_absent():
    from sd3booth.bench.report import markdown

    result = {k: v for k, v in _result().items() if k not in ("stock", "calibrate")}
    md = markdown(result)
    assert "stock stack" not in md and "training step option" not in md and "Host-to-device" not in md
    assert len(_rows(md)) == 1 + 3


def test_markdown_failed_train_option():
    from sd3booth.bench.report import markdown

    result = _result()
    failed = {k: result["calibrate"]["train"][-1][k]
              for k in ("base", "checkpoint_blocks", "swap_blocks", "activation_offload", "resolution")}  # fmt: skip
    result["calibrate"]["train"][-1] = failed | {"error": "OutOfMemoryError: CUDA out of memory"}
    md = markdown(result)
    assert "OutOfMemoryError" in md
