"""Speed-ups measured in isolation on the GPU: the transformer with its LoRA, one training step's forward and
backward at 1024 px, batch B, compiled blocks; variants: CUDA graphs (compile mode reduce-overhead) and fp8
compute of the frozen base (models.fp8_compute). Prints s/step per variant and, for fp8, the relative error of
the model output and of the LoRA gradients against bf16 on the same inputs.

  python3 tools/gpu_speed_probe.py MODEL_DIR OUT.json [BATCH]
"""

from __future__ import annotations

import json
import sys
import time

import torch


def build(model_dir: str):
    from diffusers import SD3Transformer2DModel

    from sd3booth.adapters import build as adapters
    from sd3booth.adapters.lora import resolve_targets
    from sd3booth.config.views import DEFAULT_LORA_LAYERS

    torch.manual_seed(0)
    m = SD3Transformer2DModel.from_pretrained(f"{model_dir}/transformer", torch_dtype=torch.bfloat16).cuda()
    m.requires_grad_(False)
    params = adapters.add_adapter(
        m, adapters.AdapterSpec("lora", 16, 16, 0.0, 4), resolve_targets(m, list(DEFAULT_LORA_LAYERS), None)
    )
    for p in params:  # B=0 gives no gradient signal through A: a small random B makes every gradient non-zero
        if p.dim() == 2 and p.abs().sum() == 0:
            p.data.normal_(0, 1e-3)
    return m, params


def inputs(m, batch: int):
    g = torch.Generator("cuda").manual_seed(1)
    c = m.config
    x = torch.randn(batch, c.in_channels, 128, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(batch, 333, c.joint_attention_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(batch, c.pooled_projection_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.full((batch,), 500.0, device="cuda")
    return x, ctx, pooled, t


def step(m, params, args, compiled):
    if compiled is not None:
        compiled.step_begin()
    out = m(hidden_states=args[0], encoder_hidden_states=args[1], pooled_projections=args[2], timestep=args[3],
            return_dict=False)[0]  # fmt: skip
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach().float().clone(), grads


def timed(m, params, args, compiled, n=20):
    from sd3booth.models.speed import attention_context

    with attention_context(torch.device("cuda")):
        for _ in range(3):
            step(m, params, args, compiled)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step(m, params, args, compiled)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n
        out, grads = step(m, params, args, compiled)
    return dt, out, grads


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main(model_dir: str, path: str, batch: int = 1) -> None:
    from sd3booth.models.fp8_compute import apply_fp8_compute
    from sd3booth.models.speed import CompiledBlocks

    rows = {}
    m, params = build(model_dir)
    args = inputs(m, batch)
    ref = None
    for name, mode, fp8 in [("bf16", None, False), ("bf16_cudagraphs", "reduce-overhead", False),
                            ("fp8", None, True), ("fp8_cudagraphs", "reduce-overhead", True)]:  # fmt: skip
        if fp8 and not rows.get("converted"):
            rows["converted"] = apply_fp8_compute(m.transformer_blocks)
        torch._dynamo.reset()
        cb = CompiledBlocks(m.transformer_blocks, mode=mode)
        t0 = time.perf_counter()
        try:
            step(m, params, args, cb)
            first = time.perf_counter() - t0
            dt, out, grads = timed(m, params, args, cb)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the others still run
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            cb.remove()
            continue
        cb.remove()
        row = {
            "s_per_step": round(dt, 4),
            "first_step_s": round(first, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        if ref is None:
            ref = (out, grads)
        else:
            row["out_rel_err"] = round(rel(out, ref[0]), 5)
            row["grad_rel_err"] = round(rel(torch.cat([g.flatten().float() for g in grads]),
                                            torch.cat([g.flatten().float() for g in ref[1]])), 5)  # fmt: skip
        rows[name] = row
        print(name, row, flush=True)
        torch.cuda.reset_peak_memory_stats()
    rows["batch"] = batch
    rows["device"] = torch.cuda.get_device_name()
    rows["torch"] = torch.__version__
    open(path, "w").write(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
