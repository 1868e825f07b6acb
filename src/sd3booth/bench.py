"""``sd3booth bench``: memory and speed of every stage on the GPU, beside the stock stack, in one run.

Parts (``--parts``, any of):
* ``stock``     the stock stack of the notes: diffusers transformer + peft LoRA + bitsandbytes AdamW8bit,
                bf16 autocast, gradient checkpointing, eager; peak memory and s/step per resolution.
* ``calibrate`` our loading code, stage by stage: each text encoder and T5 mode, VAE encode/decode whole and
                tiled, training steps for each storage/checkpointing/swap/offload option, sampling; fits the
                planner's coefficients (``calibration.json``) and measures the error of NF4/fp8 bases
                (model output, LoRA gradient) and of quantised/streamed/CPU T5 (cosine similarity).
* ``budgets``   the real ``sd3booth train`` CLI, one subprocess per ``--max_vram`` budget, each under a hard
                cap (``torch.cuda.set_per_process_memory_fraction``), so exceeding the budget fails the run.
* ``speed``     the training step of our stack (eager and compiled) against the stock stack at batch 1 and 4,
                model-FLOP utilisation, compiled-vs-eager parity, a profile of each (see bench_speed.py).

Random weights at true size: the numbers say everything about memory and speed, nothing about quality.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.plan.choose import PLAN_SETTINGS

GIB = 2**30
CAP_ENV = "SD3BOOTH_MEMORY_CAP_GIB"  # read by train(): hard cap on this process's GPU memory


def _sync() -> None:
    torch.cuda.synchronize()


def _reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / GIB


def _reserved() -> float:
    return torch.cuda.max_memory_reserved() / GIB


def _inputs(cfg: dict[str, Any], res: int, batch: int, t5_len: int = 77, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    lat = res // 8
    return dict(
        hidden_states=torch.randn(
            batch, cfg["in_channels"], lat, lat, device="cuda", generator=g, dtype=torch.bfloat16
        ),
        encoder_hidden_states=torch.randn(
            batch, 77 + t5_len, cfg["joint_attention_dim"], device="cuda", generator=g, dtype=torch.bfloat16
        ),
        pooled_projections=torch.randn(
            batch, cfg["pooled_projection_dim"], device="cuda", generator=g, dtype=torch.bfloat16
        ),
        timestep=torch.full((batch,), 500.0, device="cuda"),
    )


def _time_steps(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    _sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lora_step(
    model: Any, params: list, opt: Any, inp: dict[str, torch.Tensor], offload: bool = False
) -> Callable[[], None]:
    def step() -> None:
        saver = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
        with torch.autocast("cuda", dtype=torch.bfloat16), saver:
            out = model(**inp, return_dict=False)[0]
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---- stock stack -----------------------------------------------------------------------------------------


def stock_stack(model_dir: Path, rank: int, checkpointing: bool) -> tuple[Any, list[torch.Tensor], Any]:
    """(model, LoRA params, optimizer) of the recipe behind the notes' stock numbers, written the way the
    diffusers example writes it: bf16 base, peft LoRA in fp32, bitsandbytes AdamW8bit."""
    import bitsandbytes as bnb
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from sd3booth.config import DEFAULT_LORA_LAYERS

    model = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.bfloat16).to("cuda")
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(DEFAULT_LORA_LAYERS))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, params, bnb.optim.AdamW8bit(params, lr=1e-4)


def bench_stock(model_dir: Path, resolutions: list[int], steps: int, rank: int) -> list[dict[str, Any]]:
    """The stock stack's training step (with checkpointing) at each resolution."""
    rows = []
    for res in resolutions:
        _reset()
        model, params, opt = stock_stack(model_dir, rank, True)
        weights = torch.cuda.memory_allocated() / GIB
        s = _time_steps(_lora_step(model, params, opt, _inputs(model.config, res, 1)), steps)
        rows.append(
            {
                "stack": "stock",
                "resolution": res,
                "weights_gib": round(weights, 3),
                "peak_gib": round(_peak(), 3),
                "reserved_gib": round(_reserved(), 3),
                "s_per_step": round(s, 4),
            }
        )
        del model, params, opt
    _reset()
    return rows


# ---- calibration -----------------------------------------------------------------------------------------


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    _reset()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, _peak(), time.perf_counter() - t0


def _train_option(
    src: Any,
    sizes: Any,
    dev: torch.device,
    rank: int,
    steps: int,
    option: tuple,
    ref_state: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One training-step measurement: storage, checkpointing, swap and offload as given, batch 1."""
    import bitsandbytes as bnb

    from sd3booth.adapters import lora
    from sd3booth.config import DEFAULT_LORA_LAYERS
    from sd3booth.models import loaders, placement

    base, ckpt, swap, offload, res = option
    _reset()

    place = placement.Placement(
        **{
            **placement.plan_placement(dev, "bf16", "bf16").__dict__,
            "base": base,
            "checkpoint_blocks": ckpt,
            "swap_blocks": swap,
            "activation_offload": offload,
        }
    )
    torch.manual_seed(0)
    model = loaders.load_transformer(src, place)
    params = lora.add_lora(model, rank, rank, 0.0, lora.resolve_targets(model, list(DEFAULT_LORA_LAYERS), None))
    with torch.no_grad():
        for p in params:  # non-zero B, the same in every option, so gradients and outputs compare
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.01)
    loaders.apply_fp8_storage(model, place)
    swapper = loaders.attach_memory_savers(model, place)

    opt = bnb.optim.AdamW8bit(params, lr=0.0)  # lr 0: weights stay equal across steps and options
    inp = _inputs(model.config, res, 1)
    weights = torch.cuda.memory_allocated() / GIB
    step = _lora_step(model, params, opt, inp, offload)
    s = _time_steps(step, steps)
    row = {
        "base": base,
        "checkpoint_blocks": ckpt,
        "swap_blocks": swap,
        "activation_offload": offload,
        "resolution": res,
        "weights_gib": round(weights, 3),
        "peak_gib": round(_peak(), 3),
        "reserved_gib": round(_reserved(), 3),
        "s_per_step": round(s, 4),
    }
    if res == 1024 and not offload and not swap:  # error of quantised storage against bf16, same inputs
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inp, return_dict=False)[0].float()
        out.square().mean().backward()
        grad = torch.cat([p.grad.flatten().float() for p in params])
        if base == "bf16" and ckpt == sizes.n_blocks:
            ref_state.update(out=out.detach(), grad=grad.detach())
        elif ref_state and base != "bf16":
            row["output_rel_err"] = round(((out - ref_state["out"]).norm() / ref_state["out"].norm()).item(), 5)
            row["lora_grad_rel_err"] = round(((grad - ref_state["grad"]).norm() / ref_state["grad"].norm()).item(), 5)
    if base == "bf16" and ckpt == 0 and res == 1024:  # sampling: no-grad forward, batch 2 (guidance)
        inp2 = _inputs(model.config, res, 2)
        _reset()
        before = torch.cuda.memory_allocated() / GIB
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(**inp2, return_dict=False)
        _sync()
        row["inference_b2_act_gib"] = round(_peak() - before, 3)
    if swapper is not None:
        swapper.remove()
    del model, params, opt, swapper, step
    _reset()
    log(f"train {row}")
    return row


def bench_calibrate(model_dir: Path, steps: int, rank: int, log: Callable[[str], None]) -> dict[str, Any]:
    from sd3booth.cache import text as cache_text
    from sd3booth.models import loaders, placement, source
    from sd3booth.plan.sizes import read_sizes

    src = source.resolve_model(str(model_dir))
    sizes = read_sizes(model_dir)
    dev = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    prompts = [f"a photo of sks toy number {i} in a garden, detailed, sharp focus" for i in range(8)]

    # text encoders: 8 prompts x 256 T5 tokens, the notes' workload
    def encode(index: int, t5: str, batch_prompts: list[str]) -> torch.Tensor:
        place = placement.plan_placement(dev, "bf16", t5)
        tok, enc = loaders.load_text_encoder(src, index, place)
        with torch.no_grad():
            if index < 3:
                out = cache_text._clip_embed(tok, enc, batch_prompts, dev)[0]
            else:
                out = cache_text._t5_embed(tok, enc, batch_prompts, place.t5_device, 256)
        loaders.free(enc)
        return out

    for index, name in ((1, "CLIP-L"), (2, "CLIP-G")):
        _, peak, secs = _measure(lambda i=index: encode(i, "bf16", prompts))
        rows.append({"stage": name, "option": "bf16 x8", "peak_gib": round(peak, 3), "seconds": round(secs, 2)})
    t5_ref = None
    for mode in ("bf16", "int8", "nf4", "stream", "cpu"):
        use = prompts if mode != "cpu" else prompts[:2]
        out, peak, secs = _measure(lambda m=mode, u=use: encode(3, m, u))
        row = {"stage": "T5", "option": f"{mode} x{len(use)}", "peak_gib": round(peak, 3), "seconds": round(secs, 2)}
        if mode == "bf16":
            t5_ref = out
        else:
            ref = t5_ref[: len(use)].flatten(1).float()
            row["cosine_vs_bf16"] = round(
                torch.nn.functional.cosine_similarity(out.flatten(1).float(), ref).min().item(), 5
            )
        rows.append(row)
        log(f"T5 {mode}: peak {peak:.2f} GiB, {secs:.1f} s")

    # VAE encode and decode at 1024 px, whole and tiled
    px = torch.rand(1, 3, 1024, 1024, device=dev, dtype=torch.bfloat16) * 2 - 1
    for tiled in (False, True):
        place = placement.plan_placement(dev, "bf16", "bf16")
        place = placement.Placement(**{**place.__dict__, "vae_tiling": tiled})
        vae = loaders.load_vae(src, place)
        option = "tiled" if tiled else "whole"
        with torch.no_grad():
            _reset()
            lat = vae.encode(px).latent_dist.mean
            rows.append({"stage": "VAE encode", "option": option, "peak_gib": round(_peak(), 3)})
            _reset()
            vae.decode(lat)
            rows.append({"stage": "VAE decode", "option": option, "peak_gib": round(_peak(), 3)})
        loaders.free(vae)
        del vae, lat

    # training steps for each option (batch 1, 154 text tokens), and sampling activations
    train_rows = []
    ref_state: dict[str, Any] = {}
    options = [
        ("bf16", 0, 0, False, 1024),
        ("bf16", sizes.n_blocks, 0, False, 1024),
        ("bf16", 0, 0, False, 512),
        ("bf16", sizes.n_blocks, 0, False, 512),
        ("bf16", sizes.n_blocks, sizes.n_blocks, False, 1024),
        ("bf16", sizes.n_blocks, 0, True, 1024),
        ("nf4", sizes.n_blocks, 0, False, 1024),
        ("fp8", sizes.n_blocks, 0, False, 1024),
        ("bf16", sizes.n_blocks // 2, 0, False, 1024),
    ]
    for option in options:
        try:
            train_rows.append(_train_option(src, sizes, dev, rank, steps, option, ref_state, log))
        except Exception as e:  # noqa: BLE001 - record the failure, measure the rest
            train_rows.append(
                dict(
                    zip(("base", "checkpoint_blocks", "swap_blocks", "activation_offload", "resolution"), option),
                    error=f"{type(e).__name__}: {e}"[:300],
                )
            )
            log(f"train option {option} failed: {e}")
        _reset()

    # host-to-device bandwidth for block swap
    host = torch.empty(512 * 2**20, dtype=torch.uint8).pin_memory()
    _sync()
    t0 = time.perf_counter()
    for _ in range(5):
        host.to("cuda", non_blocking=True)
    _sync()
    h2d = 5 * host.numel() / (time.perf_counter() - t0) / 1e9
    return {"sizes": sizes.__dict__, "stages": rows, "train": train_rows, "h2d_gbps": round(h2d, 2)}


def fit_calibration(measured: dict[str, Any], seed: dict[str, Any]) -> dict[str, Any]:  # noqa: C901
    """Planner coefficients from one calibrate run (see plan.predict for the formula they enter).

    A coefficient whose measurements are missing or failed (a row with ``error``) keeps the seed's value, so
    one option that could not run on this GPU never costs the rest of the run's measurements.
    """
    sz = measured["sizes"]
    n, hidden = sz["n_blocks"], sz["hidden"]
    tr = {
        (r["base"], r["checkpoint_blocks"], r["swap_blocks"], r["activation_offload"], r["resolution"]): r
        for r in measured["train"]
        if "error" not in r
    }
    st = {(r["stage"], r["option"]): r for r in measured["stages"] if "error" not in r and "peak_gib" in r}
    cal = json.loads(json.dumps(seed))
    c, bpp, t = cal["coefficients"], cal["bytes_per_param"], cal["time"]
    fixed = c["fixed"]

    def units(res: int) -> float:
        return ((res // 16) ** 2 + 154) * hidden / GIB

    def row(base: str, k: int, s: int = 0, offload: bool = False, res: int = 1024) -> dict[str, Any] | None:
        return tr.get((base, k, s, offload, res))

    # no checkpointing at two sizes: act_full (slope per token) and the fixed overhead
    lo, hi, full = row("bf16", 0, res=512), row("bf16", 0), row("bf16", n)
    if lo and hi:
        a1024, a512 = hi["peak_gib"] - hi["weights_gib"], lo["peak_gib"] - lo["weights_gib"]
        act_full = (a1024 - a512) / ((units(1024) - units(512)) * n)
        fixed = max(0.05, a1024 - act_full * units(1024) * n)
        c.update(fixed=round(fixed, 4), act_full=round(act_full, 3))
        if "inference_b2_act_gib" in hi:
            c["act_inference"] = round(hi["inference_b2_act_gib"] / (2 * units(1024)), 3)
    if full:
        act = full["peak_gib"] - full["weights_gib"] - fixed - c["act_full"] * units(1024)
        c["act_checkpointed"] = round(max(0.0, act / (units(1024) * n)), 3)

    def stage(name: str, option: str) -> float | None:
        r = st.get((name, option))
        return r["peak_gib"] if r else None

    if (v := stage("CLIP-L", "bf16 x8")) is not None:
        c["clip_l_act_per8"] = round(v - sz["clip_l_params"] * 2 / GIB - fixed, 3)
    if (v := stage("CLIP-G", "bf16 x8")) is not None:
        c["clip_g_act_per8"] = round(v - sz["clip_g_params"] * 2 / GIB - fixed, 3)
    if (v := stage("T5", "bf16 x8")) is not None:
        c["t5_act_per8x256"] = round(max(0.0, v - sz["t5_params"] * 2 / GIB - fixed), 3)
    vae_w = sz["vae_params"] * 2 / GIB
    if (v := stage("VAE encode", "whole")) is not None:
        c["vae_encode_per_mpx"] = round(v - vae_w - fixed, 3)
    if (v := stage("VAE decode", "whole")) is not None:
        c["vae_decode_per_mpx"] = round(v - vae_w, 3)
    t5_gib = sz["t5_params"] / GIB
    for mode in ("int8", "nf4"):
        if (v := stage("T5", f"{mode} x8")) is not None:
            bpp[f"t5_{mode}"] = round((v - fixed - c["t5_act_per8x256"]) / t5_gib, 3)
    if (v := stage("T5", "stream x8")) is not None:
        c["t5_stream_base"] = round(max(0.0, v - c["t5_act_per8x256"] - fixed), 3)
    block_gib = sz["block_params"] / GIB
    c["base_extra_units"] = round(units(1024), 6)
    for base in ("nf4", "fp8"):
        r = row(base, n)
        if r is None:
            continue
        other = sz["other_params"] * 2 / GIB
        bpp[base] = round(max(0.3, (r["weights_gib"] - other) / (block_gib * n)), 4)
        if full:
            gc_act = full["peak_gib"] - full["weights_gib"]
            c["base_extra"][base] = round(max(0.0, r["peak_gib"] - r["weights_gib"] - gc_act), 3)
            t["base_factor"][base] = round(r["s_per_step"] / full["s_per_step"], 3)
    if "h2d_gbps" in measured:
        t["h2d_gbps"] = measured["h2d_gbps"]
    if full:
        t["s_per_step_1024_bf16_full_ckpt"] = full["s_per_step"]
        t["calibration_blocks"] = n
        if hi:
            t["checkpoint_overhead"] = round(full["s_per_step"] / hi["s_per_step"] - 1, 3)
        if swap := row("bf16", n, n):
            copy_s = 2 * n * sz["block_params"] * 2 / (t["h2d_gbps"] * 1e9)
            t["swap_overhead_per_block"] = round(max(0.0, swap["s_per_step"] - max(full["s_per_step"], copy_s)) / n, 5)
        if off := row("bf16", n, offload=True):
            t["activation_offload_factor"] = round(off["s_per_step"] / full["s_per_step"], 3)
    cal["source"] = (
        f"fitted by sd3booth bench --parts calibrate on {measured.get('device', '?')}, {measured.get('date', '?')}"
    )
    return cal


def refine_from_budgets(cal: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds what whole runs showed and the stage probes did not: the extra cost of decoding in the pipeline."""
    extras = []
    for r in rows:
        if r["rc"] != 0 or r["plan"]["vae_tiling"] or "predicted" not in r:
            continue
        measured = [v for k, v in r["stages"].items() if k.startswith("validation") and v is not None]
        if measured and "validation" in r["predicted"]:
            px = r["resolution"] ** 2 / 1024**2
            extras.append((max(measured) - r["predicted"]["validation"]) / px)
    if extras:
        c = cal["coefficients"]
        c["pipeline_decode_extra_per_mpx"] = round(
            max(0.0, c.get("pipeline_decode_extra_per_mpx", 0.0) + max(extras)), 3
        )
    return cal


# ---- budgets ----------------------------------------------------------------------------------------------


def bench_budgets(
    model_dir: Path,
    out: Path,
    budgets: list[float | None],
    resolution: int,
    steps: int,
    arch: str,
    log: Callable[[str], None],
    optimizer: str = "adamw8bit",
) -> list[dict[str, Any]]:
    from sd3booth.data.dataset import write_demo_like_dataset

    photos = out / "photos"
    if not photos.is_dir():
        write_demo_like_dataset(photos, n=4, size=resolution)
    rows = []
    for budget in budgets:
        name = f"budget-{budget:g}" if budget else "default"
        run = out / name
        # the loss is read back (a host sync) only at log steps, as in a real run; a compiled run logs its
        # first step (compilation) alone
        log_every = 5 if steps >= 15 else 1
        cmd = [
            sys.executable,
            "-m",
            "sd3booth",
            "train",
            "--pretrained_model_name_or_path",
            str(model_dir),
            "--instance_data_dir",
            str(photos),
            "--instance_prompt",
            "a photo of sks toy",
            "--output_dir",
            str(run),
            "--cache_dir",
            str(run / "cache"),
            "--overwrite_output_dir",
            "--resolution",
            str(resolution),
            "--train_batch_size",
            "1",
            "--max_train_steps",
            str(steps),
            "--rank",
            "16",
            "--optimizer",
            optimizer,
            "--seed",
            "0",
            "--lr_warmup_steps",
            "0",
            "--validation_prompt",
            "a photo of sks toy",
            "--num_validation_images",
            "1",
            "--validation_steps",
            str(steps),
            "--num_inference_steps",
            "4",
            "--checkpointing_steps",
            str(steps),
            "--report_to",
            "none",
            "--logging_steps",
            str(log_every),
        ]
        env = dict(os.environ)
        if budget:
            cmd += ["--max_vram", str(budget)]
            env[CAP_ENV] = str(budget)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        row: dict[str, Any] = {
            "arch": arch,
            "budget_gib": budget,
            "optimizer": optimizer,
            "resolution": resolution,
            "rc": r.returncode,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        if r.returncode == 0:
            stages = json.loads((run / "stages.json").read_text())
            plan = json.loads((run / "plan.json").read_text())
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            row["peak_gib"] = max(s.get("peak_allocated_gib", 0) for s in stages)
            row["peak_reserved_gib"] = max(s.get("peak_reserved_gib", 0) for s in stages)
            row["stages"] = {s["stage"]: s.get("peak_allocated_gib") for s in stages}
            # per-interval step times; the first interval holds the warm-up (and compilation, when compiled)
            row["s_per_step"] = round(
                statistics.median(m["s_per_step"] for m in metrics[1 if log_every > 1 else 2 :]), 4
            )
            if metrics[0]["step"] == 1:  # logged alone: compiled runs, or logging every step
                row["first_step_s"] = round(metrics[0]["s_per_step"], 2)
            row["plan"] = {k: plan[k] for k in PLAN_SETTINGS}
            row["predicted_s_per_step"] = plan["predicted_s_per_step"]
            row["predicted_peak_gib"] = max(plan["predicted"].values())
            row["predicted"] = plan["predicted"]
        else:
            row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        rows.append(row)
        log(json.dumps(row))
    return rows


# ---- report ------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"## {result['arch']} — {result['date']}, {result['device']}",
        "",
        f"`{result['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    if result.get("stock"):
        lines += [
            "| stock stack (bf16 + GC + AdamW8bit, eager) | res | weights GiB | peak GiB | s/step |",
            "|---|---|---|---|---|",
        ]
        for r in result["stock"]:
            lines.append(
                f"| stock | {r['resolution']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} |"
            )
        lines.append("")
    cal = result.get("calibrate")
    if cal:
        lines += [
            "| training step option | res | weights GiB | peak GiB | s/step | output rel. err | LoRA grad rel. err |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in cal["train"]:
            opt = f"{r['base']}, ckpt {r['checkpoint_blocks']}, swap {r['swap_blocks']}" + (
                ", act. offload" if r["activation_offload"] else ""
            )
            if "error" in r:
                lines.append(f"| {opt} | {r['resolution']} | failed: {r['error']} | | | | |")
                continue
            lines.append(
                f"| {opt} | {r['resolution']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} | "
                f"{r.get('output_rel_err', '')} | {r.get('lora_grad_rel_err', '')} |"
            )
        lines += ["", "| stage | option | peak GiB | seconds | cosine vs bf16 |", "|---|---|---|---|---|"]
        for r in cal["stages"]:
            if "peak_gib" not in r:
                lines.append(f"| {r['stage']} | {r['option']} | failed: {r.get('error', '?')} | | |")
                continue
            lines.append(
                f"| {r['stage']} | {r['option']} | {r['peak_gib']:.2f} | {r.get('seconds', '')} | "
                f"{r.get('cosine_vs_bf16', '')} |"
            )
        lines += ["", f"Host-to-device copy (pinned): {cal.get('h2d_gbps', '?')} GB/s", ""]
    if result.get("budgets"):
        lines += [
            "| --max_vram | plan | predicted peak | measured peak (alloc / reserved) | s/step (predicted) "
            "| first step s | per-stage peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["budgets"]:
            if r["rc"] != 0:
                lines.append(f"| {r['budget_gib'] or 'default'} | failed: {r.get('error', '')} | | | | | |")
                continue
            p = r["plan"]
            plan = (
                f"{p['base']}, ckpt {p['checkpoint_blocks']}, swap {p['swap_blocks']}, T5 {p['t5']}"
                + (", act. offload" if p["activation_offload"] else "")
                + (", VAE tiled" if p["vae_tiling"] else "")
                + (", compiled" if p.get("compiled") else "")
            )
            predicted_s = f" ({r['predicted_s_per_step']:.3f})" if "predicted_s_per_step" in r else ""
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if v is not None)
            lines.append(
                f"| {r['budget_gib'] or 'default'} | {plan} | {r['predicted_peak_gib']:.2f} | "
                f"{r['peak_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {r['s_per_step']:.3f}{predicted_s} | "
                f"{r.get('first_step_s', '')} | {stages} |"
            )
    if result.get("speed"):
        from sd3booth.bench_speed import markdown_speed

        lines += ["", *markdown_speed(result["speed"])]
    return "\n".join(lines) + "\n"


def run_bench(
    arch: str,
    model_dir: Path | None,
    out: Path,
    parts: list[str],
    resolutions: list[int],
    budgets: list[float | None],
    steps: int,
    command: str,
    log: Callable[[str], None] = print,
    long_steps: int = 0,
    optimizer: str = "adamw8bit",
) -> dict[str, Any]:
    import accelerate
    import diffusers
    import peft
    import transformers

    from sd3booth import __version__
    from sd3booth.models.source import quiet_libraries
    from sd3booth.plan.calibration import load_calibration
    from sd3booth.random_model import write_random_model

    if not torch.cuda.is_available():
        from sd3booth.errors import UserError

        raise UserError("sd3booth bench measures GPU memory and needs a CUDA GPU")
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or out / f"model-{arch}"
    if not (model_dir / "model_index.json").is_file():
        t0 = time.perf_counter()
        write_random_model(model_dir, arch)
        log(f"random {arch} written in {time.perf_counter() - t0:.0f} s")
    result: dict[str, Any] = {
        "arch": arch,
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0),
        "command": command,
        "versions": {
            "sd3booth": __version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    if "stock" in parts:
        result["stock"] = bench_stock(model_dir, resolutions, steps, 16)
        log(f"stock: {result['stock']}")
    if "calibrate" in parts:
        measured = bench_calibrate(model_dir, steps, 16, log)
        measured.update(device=result["device"], date=result["date"])
        result["calibrate"] = measured
        cal = fit_calibration(measured, load_calibration())
        (out / "calibration.json").write_text(json.dumps(cal, indent=2) + "\n")
        result["calibration"] = cal
    if "budgets" in parts:
        result["budgets"] = bench_budgets(model_dir, out, budgets, resolutions[0], max(steps, 6), arch, log, optimizer)
        result["calibration"] = refine_from_budgets(result.get("calibration") or load_calibration(), result["budgets"])
        (out / "calibration.json").write_text(json.dumps(result["calibration"], indent=2) + "\n")
    if "speed" in parts:
        from sd3booth.bench_speed import bench_speed, fit_compiled

        sp = result["speed"] = bench_speed(model_dir, steps, 16, log)
        measured = {**sp, "device": result["device"], "date": result["date"]}
        cal = result.get("calibration") or load_calibration()  # this call's fit if any, else the packaged one
        result["calibration"] = fit_compiled(cal, measured, sp["hidden"], sp["n_blocks"], sp["tokens"])
        (out / "calibration.json").write_text(json.dumps(result["calibration"], indent=2) + "\n")
    if "long" in parts:
        from sd3booth.bench_speed import bench_long

        result.setdefault("speed", {})["long_run"] = bench_long(model_dir, 16, long_steps or 500, log)
    (out / f"bench-{arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"bench-{arch}.md").write_text(markdown(result))
    log(markdown(result))
    return result
