"""Regional compilation and attention-kernel choice (speed.py), on the CPU.

Compilation runs through dynamo + AOTAutograd with the ``aot_eager`` backend (no C++ toolchain needed):
the same graph capture, autograd and guard logic as inductor on the GPU, without code generation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sd3booth.cli import main
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import UserError
from sd3booth.models import speed
from sd3booth.models.offload import BlockSwapper, selective_checkpointing

FAST = ["--resolution", "64", "--num_inference_steps", "2", "--report_to", "none", "--seed", "0", "--rank", "4"]


def test_attention_backends_order():
    from torch.nn.attention import SDPBackend

    assert speed.attention_backends(torch.device("cpu")) == []
    assert speed.attention_backends(torch.device("cpu"), "math") == [SDPBackend.MATH]
    assert speed.attention_backends(torch.device("cpu"), "cudnn") == [SDPBackend.CUDNN_ATTENTION]
    with speed.attention_context(torch.device("cpu"), "math"):  # usable on the CPU
        q = torch.randn(1, 2, 8, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.lora = nn.Linear(d, d, bias=False)  # trainable, like a LoRA factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x))) + self.lora(x)


def _blocks(n: int = 4) -> nn.ModuleList:
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(n))
    for b in blocks:
        b.a.requires_grad_(False)
        b.b.requires_grad_(False)
    return blocks


def _grads(blocks: nn.ModuleList, run=lambda m, x: m(x)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for blk in blocks:
        x = run(blk, x)
    x.square().mean().backward()
    grads = [blk.lora.weight.grad.clone() for blk in blocks]
    for blk in blocks:
        blk.lora.weight.grad = None
    return x.detach(), grads


@pytest.mark.parametrize("with_savers", [False, True])
def test_compiled_blocks_match_eager_and_keep_hooks(with_savers):
    """Same outputs and LoRA gradients compiled or not, with the swapper's hooks and selective checkpointing
    around the compiled forwards; ``eager()`` lends the original forwards back; the blocks share their compilations."""
    import torch._dynamo

    torch._dynamo.reset()
    blocks = _blocks()
    ref_out, ref_grads = _grads(blocks)
    run = (lambda m, x: m(x)) if not with_savers else selective_checkpointing(range(3), blocks)
    swapper = BlockSwapper(blocks, [0, 1], "cpu", record_calls=True) if with_savers else None
    compiled = speed.CompiledBlocks(blocks, backend="aot_eager")
    counter = torch._dynamo.utils.counters
    counter.clear()
    out, grads = _grads(blocks, run)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    graphs = counter["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2  # the blocks share one code object: one specialised graph, then a general one
    out2, _ = _grads(blocks, run)  # no recompilation on the next step
    assert counter["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(out2, ref_out)
    if swapper is not None:
        assert swapper.stats.calls[:4] == [0, 1, 1, 0]  # hooks still run: forward, then backward recompute
        assert blocks[1].b.weight.numel() == 0  # released when block 0 started its recompute
    assert all(b.forward is c for b, c in zip(blocks, compiled.compiled))
    with compiled.eager():
        assert all(b.forward == f for b, f in zip(blocks, compiled.eager_forwards))
        with torch.no_grad():
            x = torch.randn(5, 8)
            for b in blocks:
                x = b(x)  # a new shape, no grad: no compilation in eager mode
    assert counter["stats"]["unique_graphs"] == graphs
    assert all(b.forward is c for b, c in zip(blocks, compiled.compiled))
    compiled.remove()
    assert all(b.forward == f for b, f in zip(blocks, compiled.eager_forwards))


def test_train_compiled_matches_eager(tiny_model, tmp_path, monkeypatch):
    """The whole CLI with --compile (aot_eager on the CPU), checkpointing and block swap: the LoRA agrees with
    the eager run's, validation runs the eager forwards, and the first step is logged on its own, with the
    compile caches' counts, while inductor's caches point at the persistent folder."""
    import os

    monkeypatch.setenv(speed.BACKEND_ENV, "aot_eager")
    monkeypatch.setenv(speed.COMPILE_CACHE_ENV, str(tmp_path / "compile-cache"))
    inductor_dir = os.environ.get(speed.INDUCTOR_CACHE_ENV)
    seen = []
    real_blocks = speed.CompiledBlocks

    def blocks(*args, **kwargs):
        seen.append(os.environ.get(speed.INDUCTOR_CACHE_ENV))
        return real_blocks(*args, **kwargs)

    monkeypatch.setattr(speed, "CompiledBlocks", blocks)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    common = [
        "train",
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--instance_data_dir",
        str(data),
        "--cache_dir",
        str(tmp_path / "cache"),
        *FAST,
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "4",
        "--logging_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--validation_prompt",
        "a photo of sks toy",
        "--num_validation_images",
        "1",
        "--validation_steps",
        "2",
        "--save_precision",  # compare the weights themselves, not their bf16 rounding (one ulp apart at most)
        "fp32",
    ]
    assert main([*common, "--output_dir", str(tmp_path / "eager"), "--checkpoint_blocks", "1"]) == 0
    assert (
        main(
            [*common, "--output_dir", str(tmp_path / "compiled"), "--compile", "--blocks_to_swap", "1"]
            + ["--checkpoint_blocks", "1", "--attention_backend", "math"]
        )
        == 0
    )
    a = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "compiled" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    records = [json.loads(x) for x in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]  # step 1 (compilation) alone, then every --logging_steps
    assert set(records[0]["compile_cache"]) >= {"fxgraph_cache_hit", "autograd_cache_miss"}
    assert all("compile_cache" not in r for r in records[1:])
    assert seen == [str(tmp_path / "compile-cache")] and (tmp_path / "compile-cache").is_dir()
    assert os.environ.get(speed.INDUCTOR_CACHE_ENV) == inductor_dir  # restored after the run
    steps = [json.loads(x)["step"] for x in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert len(list((tmp_path / "compiled" / "validation" / "step-2").glob("*.png"))) == 1


def test_profile_summary_and_step_profiler_on_cpu(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            (x @ x).relu()
    s = speed.profile_summary(prof, 0.5, 2)
    assert s["steps"] == 2 and s["wall_s_per_step"] == 0.25
    assert s["kernels_per_step"] == 0 and s["gpu_busy_fraction"] == 0.0  # no CUDA kernels on the CPU
    assert any("mm" in op["name"] for op in s["top_cpu_ops"])
    assert all(op["calls_per_step"] > 0 for op in s["top_cpu_ops"])
    # a CPU run never profiles (it needs CUDA events); unset it does nothing either
    for spec in ("1:2", None):
        p = speed.StepProfiler(spec, torch.device("cpu"), tmp_path / "profile.json", print)
        for step in range(1, 5):
            p.step(step)
        assert not (tmp_path / "profile.json").exists()
    # a malformed value is one clear error before anything loads
    for bad in ("x", "3:0", "-1:2"):
        with pytest.raises(UserError, match="SD3BOOTH_PROFILE"):
            speed.StepProfiler(bad, torch.device("cpu"), tmp_path / "profile.json", print)


def test_compile_cache_folder_follows_the_settings(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = {speed.INDUCTOR_CACHE_ENV: default_cache_dir()}  # what torch sets itself once dynamo is imported
    assert speed.compile_cache_dir(env) == tmp_path / "xdg" / "sd3booth" / "compile"
    assert speed.compile_cache_dir({speed.INDUCTOR_CACHE_ENV: "/data/inductor"}) == Path("/data/inductor")
    both = {speed.INDUCTOR_CACHE_ENV: "/data/inductor", speed.COMPILE_CACHE_ENV: str(tmp_path / "mine")}
    assert speed.compile_cache_dir(both) == tmp_path / "mine"


def _compile_once(folder: Path) -> dict[str, int]:
    """The toy blocks compiled with inductor as a new run would (nothing compiled in memory); the compile
    caches' counts of that compilation."""
    import torch._dynamo

    torch._dynamo.reset()
    before = speed.compile_cache_counts()
    with speed.persistent_compile_cache(folder):
        blocks = _blocks()
        compiled = speed.CompiledBlocks(blocks, backend="inductor")
        _grads(blocks)
        compiled.remove()
    return {k: v - before[k] for k, v in speed.compile_cache_counts().items()}


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on the CPU needs a C++ compiler")
def test_compilation_is_reused_from_the_folder_and_keyed_by_torch_and_device(tmp_path, monkeypatch):
    """A second run loads every graph from the folder (forward and backward, FX graph and AOTAutograd caches);
    a different torch build or GPU (inductor's own key) misses instead of loading the first run's code."""
    from torch._inductor import codecache

    folder = tmp_path / "compile"
    cold = _compile_once(folder)
    assert cold["fxgraph_cache_miss"] >= 2 and cold["fxgraph_cache_hit"] == 0 and cold["autograd_cache_miss"] >= 1
    assert (folder / "fxgraph").is_dir() and (folder / "aotautograd").is_dir()
    warm = _compile_once(folder)
    assert warm["fxgraph_cache_miss"] == 0 and warm["autograd_cache_miss"] == 0
    assert warm["fxgraph_cache_hit"] == cold["fxgraph_cache_miss"] and warm["autograd_cache_hit"] >= 1
    system = codecache.CacheBase.get_system()
    another_gpu = {**system, "device": {"name": "another GPU"}, "hash": "another-gpu"}
    for patch in (("torch_key", lambda: b"another torch build"), ("get_system", lambda: another_gpu)):
        with monkeypatch.context() as m:
            owner = codecache if patch[0] == "torch_key" else codecache.CacheBase
            m.setattr(owner, patch[0], staticmethod(patch[1]) if owner is not codecache else patch[1])
            elsewhere = _compile_once(folder)
        assert elsewhere["fxgraph_cache_hit"] == 0 and elsewhere["autograd_cache_hit"] == 0, patch[0]
        assert elsewhere["fxgraph_cache_miss"] == cold["fxgraph_cache_miss"], patch[0]
