"""The loader of issue #10 on the GPU machine: host memory while loading, and the CUDA paths CPU tests cannot run.

Each check runs in its own child process (so each one's host peak is its own), samples the child's host RSS
from outside every 50 ms (with its anon/file/shmem parts) and prints one JSON line; all lines go to OUT.

  python3 tools/gpu_loading.py MODEL_DIR OUT CHECK [CHECK ...]
  CHECK = t5-new | t5-old   T5-XXL bf16 onto the GPU: models.reader (no mapping) / from_pretrained(device_map)
        | swap-N            the transformer with N blocks swapped, read from the file into pinned packs: host
                            RSS while it loads (sampled in the child: the reference loaded after it needs more),
                            page-locked bytes (exact) against the packs' bytes; then one training step at 512 px
                            against a swapper packed from a from_pretrained model (must be bit-identical)
        | fp8-N             as swap-N with fp8 host copies: host bytes, and the step's output and LoRA gradients
                            against the bf16 swap (relative error)
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path


def _child(model: Path, check: str) -> dict:
    import torch

    from sd3booth.models import loaders, pinned
    from sd3booth.models.placement import decide, detect_device
    from sd3booth.models.source import resolve_model
    from sd3booth.plan.choose import Plan

    src, dev = resolve_model(str(model)), torch.device("cuda")
    info = detect_device(dev)
    t0 = time.perf_counter()
    row: dict = {"check": check}
    if check.startswith("t5-"):
        place = decide(info, "bf16", Plan(t5="bf16"))
        if check == "t5-new":
            _, enc = loaders.load_text_encoder(src, 3, place)
        else:
            from transformers import T5EncoderModel

            enc = T5EncoderModel.from_pretrained(src.root / "text_encoder_3", dtype=torch.bfloat16, device_map="cuda")
        torch.cuda.synchronize()
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["checksum"] = float(sum(p.float().sum().item() for p in enc.parameters()))
        return row
    kind, n = check.split("-")
    swap, fp8 = int(n), kind == "fp8"
    out, grads, row = _step(src, dev, info, swap, fp8, row, t0)
    gc.collect()
    torch.cuda.empty_cache()
    if fp8:  # against bf16 host copies of the same blocks
        ref_out, ref_grads, _ = _step(src, dev, info, swap, False, {}, time.perf_counter())
    else:  # against the path before issue #10: from_pretrained on the host, packed by copying
        ref_out, ref_grads, _ = _step(src, dev, info, swap, False, {}, time.perf_counter(), old=True)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    row["output_rel_err"] = rel(out, ref_out)
    row["grad_rel_err_max"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
    row["bit_identical"] = torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    gc.collect()
    row["pinned_after_gib"] = round(pinned.registered_bytes() / 2**30, 3)  # 0: every pack unregistered once freed
    return row


def _step(src, dev, info, swap: int, fp8: bool, row: dict, t0: float, old: bool = False):
    import torch

    from sd3booth.bench.harness import inputs
    from sd3booth.models import loaders, pinned
    from sd3booth.models.memory import MemorySampler
    from sd3booth.models.placement import decide
    from sd3booth.plan.choose import Plan

    n_blocks = json.loads((src.root / "transformer" / "config.json").read_text())["num_layers"]
    plan = Plan(checkpoint_blocks=n_blocks, swap_blocks=swap, swap_dtype="fp8" if fp8 else "bf16")
    place = decide(info, "bf16", plan)
    before = pinned.registered_bytes()
    if old:  # the path before: the whole model into host memory, then its blocks packed by copying
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(src.root / "transformer", torch_dtype=torch.bfloat16)
        model.requires_grad_(False)
        params = _lora(model)
        loaders.attach_memory_savers(model, place)  # no packs from the loader: packed from the loaded weights
    else:
        sampler = MemorySampler(dev, interval=0.05)
        sampler.reset()
        model = loaders.load_transformer(src, place)
        _, row["load_host_peak_gib"], row["load_host_parts_gib"] = sampler.reset()  # this load only, in-process
        sampler.close()
        row["load_s"] = round(time.perf_counter() - t0, 2)
        packs = sum(f.nbytes for p in model.swap_packs.values() for f in p.flats)
        row["packs_gib"] = round(packs / 2**30, 3)
        row["pinned_gib"] = round((pinned.registered_bytes() - before) / 2**30, 3)
        params = _lora(model)
        swapper = loaders.attach_memory_savers(model, place)
        row["from_file"] = swapper.from_file
    inp = inputs(model.config, 512, 1)
    with torch.autocast("cuda", torch.bfloat16):
        out = model(**inp, return_dict=False)[0]
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    return out.detach(), [p.grad.detach().clone() for p in params], row


def _lora(model):
    import torch

    from sd3booth.adapters import lora
    from sd3booth.config import DEFAULT_LORA_LAYERS

    params = lora.add_lora(model, 16, 16, 0.0, lora.resolve_targets(model, list(DEFAULT_LORA_LAYERS), None))
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    return params


def main(argv: list[str]) -> int:
    if argv[0] == "--child":
        print("ROW " + json.dumps(_child(Path(argv[1]), argv[2])), flush=True)
        return 0
    from sd3booth.bench.budgets import run_sampled

    model, out, *checks = argv
    rows = []
    for check in checks:
        r, gpu, host, parts = run_sampled([sys.executable, __file__, "--child", model, check], interval=0.05)
        row = next((json.loads(x[4:]) for x in r.stdout.splitlines() if x.startswith("ROW ")), {"check": check})
        row.update(rc=r.returncode, host_rss_peak_gib=host, host_rss_parts_gib=parts, process_gpu_gib=gpu)
        if r.returncode:
            row["error"] = (r.stderr.strip().splitlines() or [""])[-1][:400]
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
