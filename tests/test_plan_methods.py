"""Issue #12 under tight budgets: for every training method (adapter type, text-encoder LoRA, EMA on the GPU, the
base-model prior, each optimizer) the plan for --max_vram 3 and 6 (SD3 Medium) and 6 and 16 (SD3.5 Large)
predicts the whole process within the budget, or the run stops with one line saying what to change. The settings
go through TrainConfig and the planner's own workload, so a flag that does not reach the prediction shows.
tools/gpu_method_budgets.sh runs the same combinations on the GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from plan_sizes import true_sizes

from sd3booth.config import TrainConfig
from sd3booth.config.checks import validate
from sd3booth.errors import UserError
from sd3booth.plan import choose as choose_mod
from sd3booth.plan.budget import process_overhead
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.choose import Machine, plan_for_config, predict

# what tools/gpu_card.py trains: 4 square photos at 1024 px, batch 1, rank 16, AdamW, one validation image
CARD_RUN = dict(
    pretrained_model_name_or_path="m", instance_data_dir="photos", instance_prompt="a photo of sks toy",
    resolution=1024, train_batch_size=1, rank=16, max_sequence_length=77, seed=0,
    validation_prompt=["a photo of sks toy"],
)  # fmt: skip
CARD = Machine(gpu_available_gib=79.0, overhead_gib=0.0, bf16=True, ram_available_gib=120.0)  # the H100 machine
# each method's flags, and how its training peak compares with plain LoRA + AdamW on the same plan
METHODS = {
    "lora": ({}, 0),
    "dora": ({"lora_type": "dora"}, 1),
    "loha": ({"lora_type": "loha"}, 1),  # twice the parameters
    "lokr": ({"lora_type": "lokr", "lokr_factor": 16}, -1),
    "text_encoder_lora": ({"train_text_encoder": True}, 1),
    "ema_gpu": ({"use_ema": True, "ema_device": "gpu"}, 1),
    "ema_cpu": ({"use_ema": True, "ema_device": "cpu"}, 0),
    "base_model_prior": (
        {"with_prior_preservation": True, "prior_preservation_mode": "base_model", "class_prompt": "a photo of a toy"},
        1,
    ),  # fmt: skip
    "adamw8bit": ({"optimizer": "adamw8bit"}, -1),
    "prodigy": ({"optimizer": "prodigy", "learning_rate": 1.0}, 1),
    "lion": ({"optimizer": "lion"}, -1),
    "lion8bit": ({"optimizer": "lion8bit"}, -1),
    "adafactor": ({"optimizer": "adafactor"}, -1),
    "adamw_schedulefree": ({"optimizer": "adamw_schedulefree"}, 0),
    "stableadamw": ({"optimizer": "stableadamw"}, 0),
}
# what the planner finds impossible (CLIP-L and CLIP-G with grad need ~1.6 GiB of weights and ~1.8 of activations)
IMPOSSIBLE = {("sd3-medium", 3.0): {"text_encoder_lora"}, ("sd3.5-large", 6.0): {"text_encoder_lora"}}


@pytest.fixture(scope="module")
def cal():
    return load_calibration()


def _cfg(budget: float, flags: dict) -> TrainConfig:
    cfg = TrainConfig(**{**CARD_RUN, "max_vram": budget, **flags})
    validate(cfg)  # the combination is one the CLI accepts
    return cfg


@pytest.mark.parametrize(("arch", "budget"), [("sd3-medium", 3.0), ("sd3-medium", 6.0), ("sd3.5-large", 6.0),
                                              ("sd3.5-large", 16.0)])  # fmt: skip
def test_every_method_plans_within_the_budget_or_says_what_to_change(arch, budget, cal, monkeypatch):
    sizes = true_sizes(arch)
    monkeypatch.setattr(choose_mod, "read_sizes", lambda root, variant=None: sizes)
    plans, errors = {}, {}
    for name, (flags, _) in METHODS.items():
        try:
            plans[name] = plan_for_config(_cfg(budget, flags), Path("m"), CARD, None, (1024, 1024), 1)[0]
        except UserError as e:
            errors[name] = str(e)
    assert set(errors) == IMPOSSIBLE.get((arch, budget), set())
    for msg in errors.values():  # one line: the budget, the least it needs, and the method to drop
        assert "\n" not in msg and msg.startswith(f"--max_vram {budget:g} GiB is below")
        assert "drop --train_text_encoder" in msg
    for name, p in plans.items():
        whole = p.allocator_cap_gib + process_overhead(p.compiled, CARD.overhead_gib, cal)
        assert whole == pytest.approx(budget), name  # the allocator gets the budget less what the process holds
        assert p.need <= p.allocator_cap_gib * cal["safety"], name  # every stage, headroom included
        assert p.host_peak <= CARD.ram_available_gib - 1.0, name
    # each method's own term reaches the prediction: same plan settings, its training peak against plain LoRA's
    lora = plans["lora"]
    base = lora.predicted["training"]
    for name, (flags, sign) in METHODS.items():
        work = choose_mod.workload(_cfg(budget, flags), sizes, CARD, (1024, 1024))
        same = predict(dataclasses.replace(lora, predicted={}), sizes, work, cal).predicted["training"]
        assert (same > base) - (same < base) == sign, (name, same, base)
