"""Issue #14 on the CPU: the plan's CUDA-graph choice and its memory, compiled blocks' graph mode, and fp8
compute of the frozen base (its quantisation, its autograd, the LoRA learning with it, its wrong combinations).
What only a GPU shows (speed, graphs replaying, cuBLASLt's fp8 GEMMs) is measured in BENCHMARKS.md."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cli_helpers import run_cli
from test_plan import SD3M, work
from torch import nn

from sd3booth.config import build_config
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import UserError
from sd3booth.models import speed
from sd3booth.models.fp8_compute import E4M3, Fp8FrozenLinear, apply_fp8_compute, quantise_rows
from sd3booth.models.placement import DeviceInfo, place_run
from sd3booth.plan.calibration import load_calibration
from sd3booth.plan.choose import Workload, choose, fixed_settings, plan_for_config, predict
from sd3booth.plan.terms import CUDA_GRAPHS_EXTRA_GIB, CUDA_GRAPHS_TIME_FACTOR
from sd3booth.train import loop


def _work(**kw) -> Workload:
    return work(t5_len=256, validation=True, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# ---- the plan: CUDA graphs where every block stays resident and uncheckpointed -----------------------------


def test_graphs_chosen_with_room_and_their_pool_counted_in_validation():
    cal = load_calibration()
    big = choose(SD3M, _work(), 78.0, cal)
    assert big.compiled and big.cuda_graphs and "CUDA graphs" in big.describe()
    plain = predict(dataclasses.replace(big, cuda_graphs=False), SD3M, _work(), cal)
    assert big.predicted_s_per_step == pytest.approx(CUDA_GRAPHS_TIME_FACTOR * plain.predicted_s_per_step, rel=1e-3)
    # the graphs keep the training activations through validation: validation grows by about that much
    held = big.predicted["validation"] - plain.predicted["validation"]
    assert 3.0 < held < plain.predicted["training"] - 3.0  # SD3 Medium: activations ~3.75 GiB, weights ~4
    assert big.predicted["training"] == pytest.approx(plain.predicted["training"] + CUDA_GRAPHS_EXTRA_GIB, abs=2e-3)


def test_a_budget_short_of_the_graphs_pool_plans_without_graphs_or_tiles_the_decode():
    cal = load_calibration()
    big = choose(SD3M, _work(), 78.0, cal)
    overhead = 78.0 - big.allocator_cap_gib
    between = overhead + (big.predicted["training"] + 0.2) / cal["safety"]  # training fits, validation does not
    mid = choose(SD3M, _work(), between, cal)
    assert mid.peak <= mid.allocator_cap_gib * cal["safety"]
    assert not mid.cuda_graphs or mid.vae_tiling


def test_tight_budgets_plan_without_graphs_and_forcing_them_is_a_named_conflict():
    cal = load_calibration()
    small = choose(SD3M, _work(), 3.0, cal)
    assert small.swap_blocks and not small.cuda_graphs
    with pytest.raises(UserError, match="--cuda_graphs needs compiled blocks without checkpointing or block swap"):
        choose(SD3M, _work(), 78.0, cal, {"cuda_graphs": True, "swap_blocks": 4, "checkpoint_blocks": 4})


def test_flags_fix_graphs_and_fp8_compute_keeps_blocks_resident(tiny_model):
    base = {"pretrained_model_name_or_path": str(tiny_model), "instance_data_dir": "x", "instance_prompt": "p"}
    cfg = build_config({**base, "cuda_graphs": False})
    assert fixed_settings(cfg, 24)["cuda_graphs"] is False
    cfg = build_config({**base, "base_compute": "fp8"})
    assert fixed_settings(cfg, 24) == {"base": "bf16", "swap_blocks": 0}


def test_cpu_plan_never_uses_graphs(tiny_model):
    cfg = build_config({"pretrained_model_name_or_path": str(tiny_model), "instance_data_dir": "x",
                        "instance_prompt": "p", "cuda_graphs": True, "compile": True})  # fmt: skip
    plan, budget = plan_for_config(cfg, tiny_model, None)
    assert plan.compiled and not plan.cuda_graphs and budget == 0.0


# ---- compiled blocks ---------------------------------------------------------------------------------------


def test_graph_mode_marks_each_step_and_is_dropped_for_dynamic_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    blocks = [nn.Linear(4, 4) for _ in range(2)]
    graphs = speed.CompiledBlocks(blocks, mode="reduce-overhead", backend="eager", shapes=1)
    assert graphs.cuda_graphs
    graphs.step_begin()
    assert calls == [1]
    graphs.remove()
    many = speed.CompiledBlocks(blocks, mode="reduce-overhead", backend="eager", shapes=speed.MAX_STATIC_SHAPES + 1)
    assert many.dynamic and not many.cuda_graphs
    many.step_begin()
    assert calls == [1]
    many.remove()


# ---- fp8 compute -------------------------------------------------------------------------------------------


def test_row_quantisation_maps_each_row_amax_to_448_and_round_trips():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows six orders of magnitude apart
    q, s = quantise_rows(x)
    assert q.dtype == E4M3 and s.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), 448.0))
    assert _rel(q.float() * s, x) < 0.03  # e4m3 keeps 3 mantissa bits: ~2-3 % relative error


def test_frozen_fp8_linear_matches_bf16_and_has_no_weight_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96).to(torch.bfloat16).requires_grad_(False)
    fp8 = Fp8FrozenLinear(lin)
    assert not any(p.requires_grad for p in fp8.parameters())
    assert {b.dtype for n, b in fp8.named_buffers() if n in ("w", "wt")} == {E4M3}
    x = torch.randn(3, 333, 128, dtype=torch.bfloat16, requires_grad=True)  # 333 tokens: not a multiple of 16
    ref_x = x.detach().clone().requires_grad_(True)
    y, ref = fp8(x), lin(ref_x)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert _rel(y, ref) < 0.06
    assert _rel(x.grad, ref_x.grad) < 0.06


def test_apply_replaces_frozen_gemms_and_lora_gradients_stay_close(tiny_model):
    from diffusers import SD3Transformer2DModel

    from sd3booth.adapters.build import AdapterSpec, add_adapter
    from sd3booth.adapters.lora import resolve_targets
    from sd3booth.config import DEFAULT_LORA_LAYERS

    def build():
        torch.manual_seed(0)
        net = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").requires_grad_(False)
        params = add_adapter(
            net, AdapterSpec("lora", 4, 4, 0.0, -1), resolve_targets(net, list(DEFAULT_LORA_LAYERS), None)
        )
        for p in params:
            p.data.normal_(0, 0.05)
        return net, params

    def grads(net, params):
        torch.manual_seed(1)
        c = net.config
        out = net(hidden_states=torch.randn(1, c.in_channels, 8, 8),
                  encoder_hidden_states=torch.randn(1, 13, c.joint_attention_dim),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim), timestep=torch.tensor([500.0]),
                  return_dict=False)[0]  # fmt: skip
        out.pow(2).mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in params])

    ref_net, ref_params = build()
    ref_out, ref_g = grads(ref_net, ref_params)
    net, params = build()
    n = apply_fp8_compute(net.transformer_blocks)
    kinds = {type(m).__name__ for name, m in net.transformer_blocks.named_modules() if name.endswith("base_layer")}
    assert n > 0 and kinds == {"Fp8FrozenLinear"}
    left = [
        name
        for name, m in net.transformer_blocks.named_modules()
        if type(m) is nn.Linear and not m.weight.requires_grad
    ]
    assert left and all(".norm" in f".{x}" for x in left)  # only the AdaLN GEMVs stay bf16
    out, g = grads(net, params)
    assert _rel(out, ref_out) < 0.1 and _rel(g, ref_g) < 0.15


def test_lora_learns_with_fp8_compute(tiny_model, tmp_path):
    write_demo_like_dataset(tmp_path / "photos", n=2, size=64)
    values = dict(pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(tmp_path / "photos"),
                  output_dir=str(tmp_path / "out"), resolution=64, report_to="none", seed=0, learning_rate=0.02,
                  lr_warmup_steps=0, train_batch_size=2, max_train_steps=15, checkpointing_steps=1000,
                  instance_prompt="a photo of sks toy", center_crop=True, base_compute="fp8")  # fmt: skip
    run = loop._open(build_config(values), lambda m: None)
    loop.setup(run)
    assert any(type(m).__name__ == "Fp8FrozenLinear" for m in run.transformer.modules())

    def held():
        with torch.no_grad():
            return sum(loop.micro_step_loss(run, m).item() for m in range(4)) / 4

    before = held()
    loop.loop(run)
    assert held() < 0.99 * before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_type", "dora"], "--base_compute fp8 quantises bf16 base weights under a plain LoRA"),
        (["--base_precision", "nf4"], "--base_compute fp8 quantises bf16 base weights under a plain LoRA"),
        (["--blocks_to_swap", "2"], "--base_compute fp8 keeps every block on the GPU"),
    ],
)
def test_fp8_compute_wrong_combinations_are_one_line(tiny_model, tmp_path, capsys, extra, message):
    write_demo_like_dataset(tmp_path / "photos", n=1, size=64)
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
            str(tmp_path / "photos"), "--instance_prompt", "p", "--output_dir", str(tmp_path / "out"),
            "--base_compute", "fp8", *extra]  # fmt: skip
    rc, _out, err = run_cli(argv, capsys)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_fp8_compute_on_a_gpu_without_fp8_is_refused(tiny_model):
    cfg = build_config({"pretrained_model_name_or_path": str(tiny_model), "instance_data_dir": "x",
                        "instance_prompt": "p", "base_compute": "fp8"})  # fmt: skip
    ampere = DeviceInfo(type="cuda", total_gib=24.0, bf16=True, name="NVIDIA A10G", available_gib=23.0,
                        capability=(8, 6))  # fmt: skip
    with pytest.raises(UserError, match="needs fp8 tensor cores .* NVIDIA A10G has none"):
        place_run(cfg, tiny_model, ampere)
