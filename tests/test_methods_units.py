"""Issue #12's pure pieces: robust losses, EMA maths and exact restores, optimizer construction, planner terms,
and the one-line errors of wrong combinations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sd3booth.cli import main
from sd3booth.config import OPTIMIZERS, TrainConfig
from sd3booth.plan import choose
from sd3booth.plan.sizes import read_sizes
from sd3booth.train import flow
from sd3booth.train.ema import EMA, ema_decay, export_view
from sd3booth.train.optim import make_optimizer

# ---- losses -----------------------------------------------------------------------------------------------


def test_l2_is_the_reference_square():
    pred, tgt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(flow.elementwise_loss(pred, tgt, "l2"), (pred - tgt) ** 2)


@pytest.mark.parametrize("c", [0.05, 0.1, 1.0])
def test_huber_and_smooth_l1_limits(c):
    small = torch.tensor([0.03 * c])  # not smaller: sqrt(d^2 + c^2) - c cancels in fp32
    large = torch.tensor([1e4 * c])
    zero = torch.zeros(1)
    # near zero both are quadratic: huber ~ d^2, smooth_l1 ~ d^2 / c
    torch.testing.assert_close(flow.elementwise_loss(small, zero, "huber", c), small**2, rtol=1e-3, atol=0)
    torch.testing.assert_close(flow.elementwise_loss(small, zero, "smooth_l1", c), small**2 / c, rtol=1e-3, atol=0)
    # far out both are linear: huber ~ 2c|d|, smooth_l1 ~ 2|d|
    torch.testing.assert_close(flow.elementwise_loss(large, zero, "huber", c), 2 * c * large, rtol=1e-3, atol=0)
    torch.testing.assert_close(flow.elementwise_loss(large, zero, "smooth_l1", c), 2 * large, rtol=1e-3, atol=0)


def test_robust_losses_are_smooth_and_weighted_per_sample():
    pred = torch.zeros(2, 4, requires_grad=True)
    tgt = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -5.0, 5.0, -5.0]])
    w = torch.tensor([[1.0], [2.0]])
    for kind in ("huber", "smooth_l1"):
        per = flow.per_sample_loss(pred, tgt, w, kind, 0.1)
        assert per.shape == (2,) and per[0] == 0 and per[1] > 0
        (g,) = torch.autograd.grad(per.sum(), pred)
        assert torch.isfinite(g).all() and g[0].abs().max() == 0
    assert flow.per_sample_loss(pred, tgt, w, "huber", 0.1)[1] < flow.per_sample_loss(pred, tgt, w, "l2")[1]


# ---- EMA --------------------------------------------------------------------------------------------------


def test_ema_update_follows_the_warmed_up_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], 0.9, torch.device("cpu"))
    expected = torch.zeros(3)
    for step in range(1, 6):
        p.data += 1.0
        ema.update()
        d = ema_decay(step, 0.9)
        expected = d * expected + (1 - d) * p.detach()
        torch.testing.assert_close(ema.shadow[0], expected)
    assert ema_decay(1, 0.9) == 2 / 11 and ema_decay(10_000, 0.9) == 0.9


def test_ema_state_round_trip_and_applied_restores_exact_bits():
    p = torch.nn.Parameter(torch.randn(5))
    ema = EMA([p], 0.99, torch.device("cpu"))
    for _ in range(3):
        p.data += torch.randn(5)
        ema.update()
    other = EMA([p], 0.99, torch.device("cpu"))
    other.load_state_dict(ema.state_dict())
    assert other.step == 3 and torch.equal(other.shadow[0], ema.shadow[0])
    before = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), before)


def test_schedule_free_export_view_is_eval_mode_and_restores_exact_bits():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    opt = make_optimizer("adamw_schedulefree", [p], 1e-2, (0.9, 0.999), 0.0, 1e-8, {})
    opt.train()
    for _ in range(3):
        p.grad = torch.randn(16)
        opt.step()
    train_bits = p.detach().clone()
    with export_view(opt, None, [p]):
        eval_bits = p.detach().clone()
    assert not torch.equal(eval_bits, train_bits)  # eval mode shows the averaged iterate
    assert torch.equal(p.detach(), train_bits) and opt.param_groups[0]["train_mode"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_on_param_groups(name):
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    lr_b = {} if name == "prodigy" else {"lr": 1e-2}  # Prodigy adapts one rate for all groups
    lr = 1.0 if name == "prodigy" else 1e-3  # Prodigy's rate is a multiplier of its own estimate
    opt = make_optimizer(name, [{"params": [a]}, {"params": [b], **lr_b}], lr, (0.9, 0.999), 0.0, 1e-8, {})
    if hasattr(opt, "train"):
        opt.train()
    for _ in range(3):
        a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
        opt.step()
    assert not torch.equal(a.detach(), torch.ones(4, 4)) and not torch.equal(b.detach(), torch.ones(4, 4))


# ---- planner ----------------------------------------------------------------------------------------------


def test_planner_knows_the_methods(tiny_model):
    sizes = dataclasses.replace(read_sizes(tiny_model), hidden=1536)  # SD3 Medium's width
    cal = choose.load_calibration()
    work = choose.Workload(resolution=1024, batch=1, t5_len=77, rank=16, lora_params=10**7, optimizer="adamw",
                           validation=False, class_images=False, adapted_layers=16)  # fmt: skip
    plan = choose.Plan()
    base = choose.predict(plan, sizes, work, cal).predicted["training"]
    for change in (dict(text_encoder_rank=16), dict(ema_gpu=True), dict(adapter="dora"), dict(adapter="loha"),
                   dict(optimizer="prodigy")):  # fmt: skip
        more = choose.predict(plan, sizes, dataclasses.replace(work, **change), cal).predicted["training"]
        assert more > base, change
    lion = choose.predict(plan, sizes, dataclasses.replace(work, optimizer="lion8bit"), cal).predicted["training"]
    assert lion < base
    dora = choose.choose(sizes, dataclasses.replace(work, adapter="dora"), 80.0, cal, {"checkpoint_blocks": 2})
    assert dora.base != "fp8"
    for kind in ("loha", "lokr"):
        plans = [choose.choose(sizes, dataclasses.replace(work, adapter=kind), b, cal) for b in (80.0, 1.2)]
        assert all(p.base != "nf4" for p in plans)


# ---- wrong combinations: one line, exit 2 -----------------------------------------------------------------

BAD = {
    "dora alias with loha": (["--use_dora", "--lora_type", "loha"], "--use_dora conflicts with --lora_type loha"),
    "te rank without te": (["--text_encoder_rank", "8"], "--text_encoder_rank needs --train_text_encoder"),
    "base prior without class prompt": (
        ["--with_prior_preservation", "--prior_preservation_mode", "base_model"],
        "--prior_preservation_mode base_model needs --class_prompt",
    ),
    "base prior without prior": (
        ["--prior_preservation_mode", "base_model", "--class_prompt", "a dog"],
        "needs --with_prior_preservation",
    ),
    "lokr factor on lora": (["--lokr_factor", "8"], "--lokr_factor applies to --lora_type lokr only"),
    "dropout on loha": (["--lora_type", "loha", "--lora_dropout", "0.1"], "--lora_dropout applies to lora and dora"),
    "dora on fp8": (["--lora_type", "dora", "--base_precision", "fp8"], "fp8 storage hides"),
    "lokr on nf4": (["--lora_type", "lokr", "--base_precision", "nf4"], "needs unquantised base weights"),
    "schedule-free with cosine": (
        ["--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"],
        "replaces the schedule",
    ),
    "schedule-free with ema": (["--optimizer", "adamw_schedulefree", "--use_ema"], "already averages"),
    "8bit adam with lion": (["--use_8bit_adam", "--optimizer", "lion"], "--use_8bit_adam conflicts with --optimizer"),
    "prodigy with te lr": (
        ["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "1e-5"],
        "drop --text_encoder_lr",
    ),
    "ema decay": (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1)"),
    "huber c": (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be positive"),
    "unknown loss": (["--loss_type", "l1"], "--loss_type"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_combinations_are_one_line_errors(tmp_path, capsys, case):
    flags, expected = BAD[case]
    argv = ["train", "--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(tmp_path), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err


def test_help_lists_every_new_choice(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--lora_type {lora,dora,loha,lokr}", "--use_dora", "--lokr_factor", "--train_text_encoder",
                 "--text_encoder_lr", "--text_encoder_rank", "--use_ema", "--ema_decay", "--ema_device {cpu,gpu}",
                 "--prior_preservation_mode {class_images,base_model}", "--loss_type {l2,huber,smooth_l1}",
                 "--huber_c", "lion8bit", "adafactor", "adamw_schedulefree", "stableadamw"):  # fmt: skip
        assert flag in text, flag
    assert TrainConfig(use_dora=True).adapter_type == "dora"
