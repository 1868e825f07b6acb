"""``bench --parts calibrate``: our loading code stage by stage, the raw measurements the planner's
coefficients are fitted from (:func:`sd3booth.bench.fit.fit_calibration`).

* each text encoder (8 prompts x 256 T5 tokens, the notes' workload) and each T5 mode, with the cosine
  similarity of quantised/streamed/CPU T5 embeddings to bf16;
* VAE encode and decode at 1024 px, whole and tiled;
* a training step for each storage/checkpointing/swap/offload option (batch 1, 154 text tokens), with the
  error of NF4/fp8 bases against bf16 (model output, LoRA gradient) and the sampling forward's activations;
* the pinned host-to-device copy rate (block swap).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd3booth.bench.fit import OPTION_FIELDS
from sd3booth.bench.harness import (
    RANK,
    allocated,
    inputs,
    lora_step,
    measure,
    our_lora_model,
    peak,
    placement_for,
    reserved,
    reset,
    sync,
    time_steps,
)

PROMPTS = [f"a photo of sks toy number {i} in a garden, detailed, sharp focus" for i in range(8)]


def train_options(n: int) -> list[tuple]:
    """The training-step options measured, as (base, checkpoint_blocks, swap_blocks, offload, resolution)."""
    return [
        ("bf16", 0, 0, False, 1024),
        ("bf16", n, 0, False, 1024),
        ("bf16", 0, 0, False, 512),
        ("bf16", n, 0, False, 512),
        ("bf16", n, n, False, 1024),
        ("bf16", n, 0, True, 1024),
        ("nf4", n, 0, False, 1024),
        ("fp8", n, 0, False, 1024),
        ("bf16", n // 2, 0, False, 1024),
    ]


def _encode(src: Any, dev: torch.device, index: int, t5: str, prompts: list[str]) -> torch.Tensor:
    from sd3booth.cache.text import encode_batch
    from sd3booth.models import loaders

    place = placement_for(dev, t5)
    tok, enc = loaders.load_text_encoder(src, index, place)
    with torch.no_grad():
        out = encode_batch(tok, enc, index, prompts, place.t5_device if index == 3 else dev, 256)[0]
    loaders.free(enc)
    return out


def _text_encoders(src: Any, dev: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for index, name in ((1, "CLIP-L"), (2, "CLIP-G")):
        _, pk, secs = measure(lambda i=index: _encode(src, dev, i, "bf16", PROMPTS))
        rows.append({"stage": name, "option": "bf16 x8", "peak_gib": round(pk, 3), "seconds": round(secs, 2)})
    t5_ref = None
    for mode in ("bf16", "int8", "nf4", "stream", "cpu"):
        use = PROMPTS if mode != "cpu" else PROMPTS[:2]
        out, pk, secs = measure(lambda m=mode, u=use: _encode(src, dev, 3, m, u))
        row = {"stage": "T5", "option": f"{mode} x{len(use)}", "peak_gib": round(pk, 3), "seconds": round(secs, 2)}
        if mode == "bf16":
            t5_ref = out
        else:
            ref = t5_ref[: len(use)].flatten(1).float()
            cosine = torch.nn.functional.cosine_similarity(out.flatten(1).float(), ref).min().item()
            row["cosine_vs_bf16"] = round(cosine, 5)
        rows.append(row)
        log(f"T5 {mode}: peak {pk:.2f} GiB, {secs:.1f} s")
    return rows


def _vae(src: Any, dev: torch.device) -> list[dict[str, Any]]:
    from sd3booth.models import loaders

    rows = []
    px = torch.rand(1, 3, 1024, 1024, device=dev, dtype=torch.bfloat16) * 2 - 1
    for tiled in (False, True):
        vae = loaders.load_vae(src, placement_for(dev, vae_tiling=tiled))
        option = "tiled" if tiled else "whole"
        with torch.no_grad():
            reset()
            lat = vae.encode(px).latent_dist.mean
            rows.append({"stage": "VAE encode", "option": option, "peak_gib": round(peak(), 3)})
            reset()
            vae.decode(lat)
            rows.append({"stage": "VAE decode", "option": option, "peak_gib": round(peak(), 3)})
        loaders.free(vae)
        del vae, lat
    return rows


def _quantisation_error(model: Any, params: list, inp: dict, row: dict, is_ref: bool, ref_state: dict) -> None:
    """Output and LoRA-gradient error of a quantised base against the bf16 reference, same inputs."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**inp, return_dict=False)[0].float()
    out.square().mean().backward()
    grad = torch.cat([p.grad.flatten().float() for p in params])
    if is_ref:
        ref_state.update(out=out.detach(), grad=grad.detach())
    elif ref_state and row["base"] != "bf16":
        row["output_rel_err"] = round(((out - ref_state["out"]).norm() / ref_state["out"].norm()).item(), 5)
        row["lora_grad_rel_err"] = round(((grad - ref_state["grad"]).norm() / ref_state["grad"].norm()).item(), 5)


def _sampling_activations(model: Any) -> float:
    """GiB a no-grad forward at 1024 px, batch 2 (guidance), adds to the resident model."""
    inp2 = inputs(model.config, 1024, 2)
    reset()
    before = allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(**inp2, return_dict=False)
    sync()
    return round(peak() - before, 3)


def _train_option(
    src: Any, n: int, dev: torch.device, rank: int, steps: int, option: tuple, ref_state: dict[str, Any]
) -> dict[str, Any]:
    """One training-step measurement: storage, checkpointing, swap and offload as given, batch 1."""
    import bitsandbytes as bnb

    from sd3booth.models import loaders

    base, ckpt, swap, offload, res = option
    reset()
    place = placement_for(dev, base=base, checkpoint_blocks=ckpt, swap_blocks=swap, activation_offload=offload)
    model, params = our_lora_model(src, place, rank)
    loaders.apply_fp8_storage(model, place)
    swapper = loaders.attach_memory_savers(model, place)
    opt = bnb.optim.AdamW8bit(params, lr=0.0)  # lr 0: weights stay equal across steps and options
    inp = inputs(model.config, res, 1)
    weights = allocated()
    step = lora_step(model, params, opt, inp, offload)
    s = time_steps(step, steps)
    row = dict(zip(OPTION_FIELDS, option))
    row.update(weights_gib=round(weights, 3), peak_gib=round(peak(), 3), reserved_gib=round(reserved(), 3),
               s_per_step=round(s, 4))  # fmt: skip
    if res == 1024 and not offload and not swap:
        _quantisation_error(model, params, inp, row, base == "bf16" and ckpt == n, ref_state)
    if base == "bf16" and ckpt == 0 and res == 1024:
        row["inference_b2_act_gib"] = _sampling_activations(model)
    if swapper is not None:
        swapper.remove()
    del model, params, opt, swapper, step
    reset()
    return row


def _train_rows(src: Any, n: int, dev: torch.device, rank: int, steps: int, log: Callable[[str], None]) -> list:
    rows = []
    ref_state: dict[str, Any] = {}
    for option in train_options(n):
        try:
            rows.append(_train_option(src, n, dev, rank, steps, option, ref_state))
            log(f"train {rows[-1]}")
        except Exception as e:  # noqa: BLE001 - record the failure, measure the rest
            rows.append(dict(zip(OPTION_FIELDS, option), error=f"{type(e).__name__}: {e}"[:300]))
            log(f"train option {option} failed: {e}")
        reset()
    return rows


def _h2d_gbps() -> float:
    host = torch.empty(512 * 2**20, dtype=torch.uint8).pin_memory()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        host.to("cuda", non_blocking=True)
    sync()
    return round(5 * host.numel() / (time.perf_counter() - t0) / 1e9, 2)


def bench_calibrate(model_dir: Path, steps: int, rank: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The raw calibration measurements: {sizes, stages, train, h2d_gbps}."""
    from sd3booth.models import source
    from sd3booth.plan.sizes import read_sizes

    src = source.resolve_model(str(model_dir))
    sizes = read_sizes(model_dir)
    dev = torch.device("cuda")
    stages = _text_encoders(src, dev, log) + _vae(src, dev)
    train = _train_rows(src, sizes.n_blocks, dev, rank or RANK, steps, log)
    return {"sizes": sizes.__dict__, "stages": stages, "train": train, "h2d_gbps": _h2d_gbps()}
