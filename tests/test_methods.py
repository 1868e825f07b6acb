"""Issue #12's training methods on a tiny random SD3: every adapter type and optimizer trains, resumes exactly,
saves files that diffusers, ComfyUI's rules and LyCORIS read, and is applied by ``generate``; EMA, the
text-encoder LoRA, the base-model prior and the robust losses; wrong combinations are one-line errors."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys

import comfy_rules
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from sd3booth.adapters import apply, formats, text_encoder
from sd3booth.adapters.build import AdapterSpec, add_adapter
from sd3booth.cli import main
from sd3booth.config import DEFAULT_LORA_LAYERS, build_config
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.train import loop

FAST = ["--resolution", "64", "--num_inference_steps", "2", "--report_to", "none", "--seed", "0", "--rank", "4",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--center_crop"]  # fmt: skip
# each run pairs an adapter type with an optimizer, so that every type and every optimizer has a resume test
RUNS = {
    "lora-schedulefree": ["--optimizer", "adamw_schedulefree", "--lr_scheduler", "constant_with_warmup",
                          "--lr_warmup_steps", "2"],
    "dora-adafactor": ["--lora_type", "dora", "--optimizer", "adafactor", "--lora_dropout", "0.1"],
    "loha-lion": ["--lora_type", "loha", "--optimizer", "lion"],
    "lokr-lion8bit": ["--lora_type", "lokr", "--optimizer", "lion8bit", "--lokr_factor", "4",
                      "--lora_layers", "attn.to_q,ff.net.0.proj"],
    "te-ema-baseprior-stableadamw": ["--train_text_encoder", "--text_encoder_lr", "5e-4", "--use_ema",
                                     "--ema_device", "cpu", "--with_prior_preservation", "--prior_preservation_mode",
                                     "base_model", "--class_prompt", "a photo of a toy", "--loss_type", "huber",
                                     "--optimizer", "stableadamw"],
}  # fmt: skip
KINDS = ("lora", "dora", "loha", "lokr")


def _args(tiny_model, data, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--cache_dir",
            str(out.parent / "cache"), "--train_batch_size", "2", "--checkpointing_steps", "2", *FAST,
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Each RUNS entry trained straight for 4 steps (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("methods")
    write_demo_like_dataset(root / "photos", n=4, size=64)
    for name, extra in RUNS.items():
        assert main(_args(tiny_model, root / "photos", root / name, *extra, "--max_train_steps", "4")) == 0
    return root


# ---- every type and optimizer resumes exactly -------------------------------------------------------------


@pytest.mark.parametrize("name", list(RUNS))
def test_interrupted_run_resumes_bit_identically(tiny_model, runs, name):
    """A run killed after checkpoint-2, then resumed to 4 steps, writes the same bits as the straight run: every
    adapter file (EMA and raw, ComfyUI DoRA file), so optimizer state, EMA and schedule-free's eval/train
    round trips at the checkpoint are all restored exactly."""
    straight, resumed = runs / name, runs / f"{name}-resumed"
    resumed.mkdir()
    shutil.copy(straight / "settings.json", resumed / "settings.json")
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    args = _args(tiny_model, runs / "photos", resumed, *RUNS[name], "--max_train_steps", "4")
    assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
    files = sorted(p.name for p in straight.glob("*.safetensors"))
    assert files == sorted(p.name for p in resumed.glob("*.safetensors"))
    for f in files:
        a, b = load_file(straight / f), load_file(resumed / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    raw = load_file(straight / "checkpoints" / "checkpoint-4" / "lora.safetensors")
    first = load_file(straight / "checkpoints" / "checkpoint-2" / "lora.safetensors")
    assert any(not torch.equal(raw[k], first[k]) for k in raw)  # it trained between the checkpoints


def test_ema_file_is_the_average_and_raw_file_the_weights(runs):
    out = runs / "te-ema-baseprior-stableadamw"
    ema, raw = load_file(out / formats.LORA_FILE), load_file(out / "pytorch_lora_weights_raw.safetensors")
    assert ema.keys() == raw.keys() and any(k.startswith("text_encoder_2.") for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    state = torch.load(out / "checkpoints" / "checkpoint-4" / "trainer_state.pt", weights_only=False)
    assert state["ema"]["step"] == 4


# ---- every type learns -------------------------------------------------------------------------------------


def _held_loss(run, micro_batches):
    with torch.no_grad():
        return sum(loop.micro_step_loss(run, m).item() for m in micro_batches) / len(micro_batches)


@pytest.mark.parametrize("kind", [*KINDS, "text_encoder"])
def test_every_adapter_type_learns(tiny_model, tmp_path, kind):
    """15 steps on two images lower the loss of fixed micro-batches (same timesteps and noise) by over 1 %; the
    real set-up and loop, the tiny model's noise-dominated loss (LoRA drops it ~4 %, LoKr ~2 %)."""
    write_demo_like_dataset(tmp_path / "photos", n=2, size=64)
    values = dict(pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(tmp_path / "photos"),
                  output_dir=str(tmp_path / "out"), resolution=64, report_to="none", seed=0, learning_rate=0.02,
                  lr_warmup_steps=0, train_batch_size=2, max_train_steps=15, checkpointing_steps=1000,
                  instance_prompt="a photo of sks toy", center_crop=True)  # fmt: skip
    if kind == "text_encoder":
        values.update(train_text_encoder=True, lora_layers="attn.to_q")
    else:
        values["lora_type"] = kind
    run = loop._open(build_config(values), lambda m: None)
    loop.setup(run)
    before = _held_loss(run, range(4))
    te_before = [p.detach().clone() for p in run.text.params()] if run.text else []
    loop.loop(run)
    after = _held_loss(run, range(4))
    assert after < 0.99 * before, (kind, before, after)
    if run.text is not None:  # the CLIP LoRAs trained too
        assert any(not torch.equal(a, p) for a, p in zip(te_before, run.text.params()))


# ---- files: ComfyUI's rules, LyCORIS, diffusers, generate --------------------------------------------------


def _randomised(tiny_model, kind, layers=(*DEFAULT_LORA_LAYERS, "ff.net.0.proj"), alpha=8):
    """A transformer with an adapter whose every weight is random (non-zero delta, non-trivial magnitude)."""
    net = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    spec = AdapterSpec(kind, 4, alpha, 0.0, 4 if kind == "lokr" else -1)
    add_adapter(net, spec, list(layers))
    g = torch.Generator().manual_seed(1)
    for n, p in net.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g)
            p.data = p.data * (1 + 0.1 * noise) if "magnitude" in n else noise * 0.2
    return net, spec


def _merged(model):
    """Our effective weights: peft merges every adapter layer of a copy; module name -> weight."""
    model = copy.deepcopy(model)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
            out[name] = m.get_base_layer().weight.detach().float()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_rules_consume_every_key_and_merge_to_our_weights(tiny_model, tmp_path, kind):
    net, spec = _randomised(tiny_model, kind)
    paths = formats.save_adapter(tmp_path, net, spec, None, tiny_model / "transformer")
    comfy_file = paths[-1]  # DoRA: the ComfyUI file; the others: the one file
    assert comfy_file.name == (formats.COMFY_FILE if kind == "dora" else formats.LORA_FILE)
    state = load_file(comfy_file)
    hidden = net.config.num_attention_heads * net.config.attention_head_dim
    patches, read = comfy_rules.load(state, comfy_rules.sd3_key_map(len(net.transformer_blocks), hidden))
    assert set(state) - read == set(), "keys ComfyUI would log as not loaded"
    base = comfy_rules.sai_weights(net)
    merged = comfy_rules.merge(base, patches)
    ours = _merged(net)
    for module, weight in ours.items():
        block, d = module.split(".", 2)[1], module.split(".", 2)[2]
        sai, third = comfy_rules.SD3_BLOCK_MAP[d]
        got = merged[f"joint_blocks.{block}.{sai}.weight"]
        got = got[third * hidden : (third + 1) * hidden] if third is not None else got
        assert not torch.allclose(weight, dict(net.named_modules())[module].base_layer.weight)
        torch.testing.assert_close(got, weight, rtol=1e-5, atol=1e-5, msg=f"{kind} {module}")
    if kind in ("loha", "lokr"):  # the second consumer: LyCORIS' own reader of its layout
        fresh = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
        assert apply.apply_lycoris(fresh, state, "test") == len(ours)
        modules = dict(fresh.named_modules())
        x = torch.randn(3, hidden)
        for module, weight in ours.items():
            m = modules[module]
            with torch.no_grad():
                torch.testing.assert_close(m(x) - m.bias, x @ weight.T, rtol=1e-4, atol=1e-4)


def test_comfyui_rules_read_the_text_encoder_lora(tiny_model, tmp_path):
    net, spec = _randomised(tiny_model, "lora", layers=["attn.to_q"])
    encoders = {}
    for name in text_encoder.NAMES:
        enc = CLIPTextModelWithProjection.from_pretrained(tiny_model / name)
        text_encoder.add_text_lora(enc, 4)
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape) * 0.2
        encoders[name] = enc
    (path,) = formats.save_adapter(tmp_path, net, spec, encoders)
    state = load_file(path)
    layers = {n: e.config.num_hidden_layers for n, e in encoders.items()}
    patches, read = comfy_rules.load(state, comfy_rules.clip_key_map(layers))
    assert {k for k in state if k.startswith("text_encoder")} - read == set()
    clip = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for name, enc in encoders.items():
        base = {f"{clip[name]}.{m}.weight": w.get_base_layer().weight.detach() for m, w in enc.named_modules()
                if isinstance(w, BaseTunerLayer)}  # fmt: skip
        merged = comfy_rules.merge(base, [p for p in patches if p[0] in base])
        for module, weight in _merged(enc).items():
            torch.testing.assert_close(merged[f"{clip[name]}.{module}.weight"], weight, rtol=1e-5, atol=1e-5)
    # diffusers parses the same file into both text encoders' LoRA keys (loading them needs peft >= 0.22,
    # which transformers 5 requires and PyPI does not have yet; see the README)
    parsed = StableDiffusion3Pipeline.lora_state_dict(str(path))
    parsed = parsed[0] if isinstance(parsed, tuple) else parsed
    assert {k.split(".")[0] for k in parsed} == {"transformer", "text_encoder", "text_encoder_2"}


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_generate_applies_the_file_as_trained(tiny_model, tmp_path, kind):
    """``apply_file`` (what generate uses: diffusers for DoRA, LyCORIS for LoHa/LoKr) reproduces the trained
    model's images; DoRA loads in diffusers with no warning and every key used."""
    net, spec = _randomised(tiny_model, kind, layers=DEFAULT_LORA_LAYERS)
    path = formats.save_adapter(tmp_path, net, spec, None, tiny_model / "transformer")[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    base = _image(pipe)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        assert apply.apply_file(pipe, path) == {}
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert [m for m in warned if not m.startswith("No LoRA keys associated to CLIPTextModel")] == []
    if kind == "dora":
        from peft.utils import get_peft_model_state_dict

        (adapter,) = pipe.transformer.peft_config
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
        assert {f"transformer.{k}" for k in loaded} == set(load_file(path))
    applied = _image(pipe)
    assert not torch.allclose(base, applied, atol=1e-4)
    trained = StableDiffusion3Pipeline.from_pretrained(tiny_model, transformer=net)
    torch.testing.assert_close(_image(trained), applied, rtol=1e-4, atol=1e-4)


def test_generate_cli_with_text_encoder_lora(runs):
    """The trained TE + EMA file through ``sd3booth generate``: the prompts go through the CLIP LoRA."""
    out = runs / "te-ema-baseprior-stableadamw"
    result = subprocess.run(
        [sys.executable, "-m", "sd3booth", "generate", "--lora", str(out / formats.LORA_FILE), "--prompt", "sks toy",
         "--num_images", "1", "--num_inference_steps", "2", "--output_dir", str(runs / "gen")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (runs / "gen" / "image-000.png").is_file()


def test_trained_files_are_read_whole_by_comfyui_rules(runs):
    """Every key of every trained run's ComfyUI-facing file maps (training output, not a constructed adapter)."""
    key_map = {**comfy_rules.sd3_key_map(2, 32), **comfy_rules.clip_key_map({"text_encoder": 2,
                                                                            "text_encoder_2": 2})}  # fmt: skip
    for name in RUNS:
        f = runs / name / (formats.COMFY_FILE if name.startswith("dora") else formats.LORA_FILE)
        state = load_file(f)
        assert set(state) - comfy_rules.load(state, key_map)[1] == set(), name
