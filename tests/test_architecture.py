"""The house rules of issue #8, checked: one placement decision shared by every command, cache keys that carry
every input of the stored tensor, stage folders imported only downward, small functions and modules."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from sd3booth.cache import latents as cache_latents
from sd3booth.cache import text as cache_text
from sd3booth.cli import main
from sd3booth.config import TrainConfig
from sd3booth.data.dataset import file_digest, write_demo_like_dataset
from sd3booth.models import placement
from sd3booth.models.placement import DeviceInfo, decide
from sd3booth.models.source import resolve_model
from sd3booth.plan.choose import Plan

PKG = Path(__file__).resolve().parents[1] / "src" / "sd3booth"
H100 = DeviceInfo(type="cuda", index=0, total_gib=79.2, bf16=True, name="simulated H100")
T4 = DeviceInfo(type="cuda", index=0, total_gib=14.6, bf16=False, name="simulated T4")

# ---- 1. one placement decision --------------------------------------------------------------------------


def test_prepare_train_and_generate_share_one_placement_and_every_cache_entry(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """Each command asks place_run; on a simulated GPU all three decide the same (recorded), then the run
    itself executes on the CPU: train after prepare encodes nothing, and generate finds its prompts cached."""
    decisions: list[tuple[str, placement.Placement]] = []
    real = placement.place_run

    def recording(cfg, root, info, cal=None, train_size=None, shapes=1):
        gpu = real(cfg, root, H100, cal, train_size, shapes)
        decisions.append((cfg.resolution, gpu))
        return real(cfg, root, info, cal, train_size, shapes)  # what actually runs here: the CPU decision

    monkeypatch.setattr(placement, "place_run", recording)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp_path / "out"
    base = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "1", "--center_crop",
            "--train_batch_size", "1", "--report_to", "none"]  # fmt: skip
    assert main(["prepare", *base]) == 0
    assert main(["train", *base]) == 0
    assert "encoding" not in capsys.readouterr().out.split("cached:")[-1]
    assert main(["generate", "--lora", str(out / "pytorch_lora_weights.safetensors"), "--prompt", "",
                 "--num_inference_steps", "1", "--output_dir", str(tmp_path / "gen"),
                 "--cache_dir", str(out / "cache")]) == 0  # fmt: skip
    assert "encoding" not in capsys.readouterr().out  # the negative prompt "" was cached by train
    assert len(decisions) == 3
    gpu_prepare, gpu_train, gpu_generate = (d for _, d in decisions)
    assert gpu_prepare == gpu_train  # every field: devices, dtypes, memory plan, budget
    src = resolve_model(str(tiny_model))
    for a, b in ((gpu_prepare, gpu_train), (gpu_train, gpu_generate)):
        assert cache_text.text_key("x", src, a, 77) == cache_text.text_key("x", src, b, 77)


def test_streamed_t5_shares_entries_with_resident_bf16_t5(tiny_model):
    """The old bug: the GPU's default plan streams T5, and a placement built without the plan did not."""
    src = resolve_model(str(tiny_model))
    stream = decide(H100, None, Plan(t5="stream"))
    resident = decide(H100, None, Plan(t5="bf16"))
    assert cache_text.text_key("x", src, stream, 77) == cache_text.text_key("x", src, resident, 77)
    for other in ("int8", "nf4", "cpu", "none"):
        assert cache_text.text_key("x", src, decide(H100, None, Plan(t5=other)), 77) != cache_text.text_key(
            "x", src, resident, 77
        )


def test_decide_from_injected_capabilities():
    h100 = decide(H100, None, Plan())
    assert (h100.device.type, h100.mixed_precision, h100.weight_dtype, h100.vae_dtype) == (
        "cuda", "bf16", torch.bfloat16, torch.bfloat16,
    )  # fmt: skip
    t4 = decide(T4, None, Plan())
    assert (t4.mixed_precision, t4.weight_dtype, t4.vae_dtype) == ("fp16", torch.float16, torch.float32)
    cpu = decide(DeviceInfo(), None, Plan(t5="stream"))
    assert (cpu.mixed_precision, cpu.memory.t5, cpu.t5_device.type) == ("no", "cpu", "cpu")
    from sd3booth.errors import UserError

    with pytest.raises(UserError, match="no bf16 support"):
        decide(T4, "bf16", Plan())
    with pytest.raises(UserError, match="need a CUDA GPU"):
        decide(DeviceInfo(), None, Plan(t5="nf4"))


def test_place_run_plans_for_the_card_and_only_fixed_settings_on_the_cpu(tiny_model):
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_model), resolution=64)
    gpu = placement.place_run(cfg, Path(tiny_model), H100)
    assert gpu.budget_gib > 0 and gpu.memory.compiled  # a GPU plan: budgeted, compiled blocks
    cpu = placement.place_run(cfg, Path(tiny_model), DeviceInfo())
    assert cpu.budget_gib == 0 and not cpu.memory.compiled and cpu.device.type == "cpu"
    fixed = placement.place_run(dataclasses.replace(cfg, blocks_to_swap=1), Path(tiny_model), DeviceInfo())
    assert fixed.memory.swap_blocks == 1


# ---- 2. cache keys carry everything that changes the stored tensor ----------------------------------------


def test_text_key_misses_when_any_input_changes(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    src = resolve_model(str(model))
    cpu32 = decide(DeviceInfo(), "no", Plan())
    k = cache_text.text_key("cap", src, cpu32, 77)
    assert k == cache_text.text_key("cap", resolve_model(str(model)), cpu32, 77)  # stable
    changed = {
        "caption": cache_text.text_key("cap ", src, cpu32, 77),
        "sequence length": cache_text.text_key("cap", src, cpu32, 154),
        "encoder dtype": cache_text.text_key("cap", src, decide(DeviceInfo(), "bf16", Plan()), 77),
        "T5 mode": cache_text.text_key("cap", src, decide(DeviceInfo(), "no", Plan(t5="none")), 77),
        "device": cache_text.text_key("cap", src, decide(H100, "bf16", Plan()), 77),
    }
    for folder in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        files = sorted(p for p in (model / folder).iterdir() if p.suffix == ".json")
        original = files[0].read_text()
        files[0].write_text(original.rstrip() + " \n")  # same meaning, different bytes and size
        changed[folder] = cache_text.text_key("cap", resolve_model(str(model)), cpu32, 77)
        files[0].write_text(original)
    same = [name for name, key in changed.items() if key == k]
    assert not same, f"the text key ignores: {same}"
    assert len(set(changed.values())) == len(changed)


def test_latent_key_misses_when_any_input_changes(tiny_model, tmp_path):
    src = resolve_model(str(tiny_model))
    a, b = write_demo_like_dataset(tmp_path / "d", n=2, size=64)
    spec = cache_latents.LatentSpec(64, False, False, False)
    vae = src.identity("vae")
    k = cache_latents.latent_key(file_digest(a), spec, vae, "float32@cpu")
    changed = {
        "image bytes": cache_latents.latent_key(file_digest(b), spec, vae, "float32@cpu"),
        "size": cache_latents.latent_key(file_digest(a), dataclasses.replace(spec, resolution=128), vae, "float32@cpu"),
        "crop": cache_latents.latent_key(
            file_digest(a), dataclasses.replace(spec, center_crop=True), vae, "float32@cpu"
        ),
        "flip": cache_latents.latent_key(file_digest(a), dataclasses.replace(spec, flip=True), vae, "float32@cpu"),
        "tiling": cache_latents.latent_key(file_digest(a), dataclasses.replace(spec, tiled=True), vae, "float32@cpu"),
        "VAE": cache_latents.latent_key(file_digest(a), spec, src.identity("transformer"), "float32@cpu"),
        "VAE dtype": cache_latents.latent_key(file_digest(a), spec, vae, "bfloat16@cpu"),
    }
    assert [n for n, key in changed.items() if key == k] == []
    assert len(set(changed.values())) == len(changed)


def test_prepare_in_another_precision_re_encodes(tiny_model, tmp_path, capsys):
    """The bug of issue #8: `prepare --mixed_precision no` then `bf16` used to re-encode nothing."""
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    base = ["prepare", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--center_crop",
            "--train_batch_size", "1"]  # fmt: skip
    assert main([*base, "--mixed_precision", "no"]) == 0
    capsys.readouterr()
    assert main([*base, "--mixed_precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "encoding 2 caption(s) (0 cached)" in out and "encoding 1 latent(s) (0 cached)" in out
    assert main([*base, "--mixed_precision", "bf16"]) == 0
    assert "encoding" not in capsys.readouterr().out.split("cached:")[0]


# ---- 4. the layout: stages imported downward, no cycles, small functions and modules -----------------------

# lower layers first; a module may import only from its own layer or those listed before it
LAYERS = [
    {"errors", "__init__", "fileio"},
    {"config"},
    {"plan"},
    {"models"},
    {"data"},
    {"cache", "tracking"},
    {"adapters"},
    {"sample"},
    {"prepare"},
    {"train", "report"},
    {"random_model", "demo", "single_file_writer"},
    {"bench"},
    {"cli", "__main__", "init_wizard", "lora_cli", "generate_cli"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"sd3booth.{top} is not placed in a layer of test_architecture.LAYERS")


def _modules() -> dict[str, Path]:
    return {
        "sd3booth." + ".".join(p.relative_to(PKG).with_suffix("").parts): p
        for p in PKG.rglob("*.py")
        if "__pycache__" not in p.parts
    }


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd3booth"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sd3booth"))
    return out


def test_stages_import_only_downward_and_there_are_no_cycles():
    mods = _modules()
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    upward = [
        f"{m} -> {i}"
        for m, deps in graph.items()
        for i in deps
        if m != "sd3booth.__init__" and _layer(m.removeprefix("sd3booth.")) < _layer(i.removeprefix("sd3booth."))
    ]
    assert not upward, "imports from a stage above:\n" + "\n".join(upward)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_functions_and_modules_stay_small():
    long_functions, long_modules = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 420:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 85:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_functions and not long_modules, "\n".join(long_functions + long_modules)


def test_calibration_json_ships_with_the_planner():
    from importlib import resources

    cal = json.loads((resources.files("sd3booth.plan") / "calibration.json").read_text())
    assert "coefficients" in cal
