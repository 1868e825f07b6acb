"""notebooks/sd3booth_colab.ipynb, executed top to bottom on the CPU against the tiny random model (the Colab-only
steps are skipped by its ON_COLAB variable), so the notebook cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sd3booth.config import FIELDS
from sd3booth.data.dataset import write_demo_like_dataset

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sd3booth_colab.ipynb"


def _kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec running this very Python (its packages, its PYTHONPATH), found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "sd3booth-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "sd3booth-test"


def _texts(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", ""))
        out.extend(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "".join(out)


def test_colab_notebook_runs_top_to_bottom_on_cpu(tiny_model, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    settings = nb.cells[first].source
    assert 'MEMORY_FLAGS = "--mixed_precision fp16 --max_vram 14 --max_ram 11"' in settings  # the T4 plan
    photos = tmp_path / "photos"
    write_demo_like_dataset(photos, n=2, size=64)
    # what Colab's T4 gets, less what a CPU cannot do: fp16 (and --max_ram until the budget work has it)
    memory = "--max_vram 14" + (" --max_ram 11" if "max_ram" in FIELDS else "")
    overrides = {
        "ON_COLAB": False,
        "SOURCE": "",  # installed already
        "MODEL": str(tiny_model),
        "PHOTOS": str(photos),
        "STEPS": 2,
        "RESOLUTION": 64,
        "MEMORY_FLAGS": memory,
        "EXTRA_FLAGS": "--rank 4 --num_inference_steps 2 --report_to none",
        "GENERATE_FLAGS": "--num_inference_steps 2 --resolution 64",
        "SAVE_TO": str(tmp_path / "saved"),
        "OUTPUT": str(tmp_path / "run"),
    }
    assert set(overrides) <= {ln.split(" =")[0] for ln in settings.splitlines() if " = " in ln}
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=_kernel(tmp_path, monkeypatch), resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    cells = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code" and c.source}
    by_step = {k.split(".")[0].removeprefix("# ---- "): v for k, v in cells.items() if k.startswith("# ---- ")}
    assert "found 2 image(s)" in _texts(by_step["4"])
    train = _texts(by_step["5"])
    assert "training 2 steps" in train and "report:" in train
    report = by_step["6"]
    kinds = [k for o in report.outputs for k in o.get("data", {})]
    assert "<iframe srcdoc=" in _texts(report) and kinds.count("image/png") == 2  # the report, 2 validation images
    assert [k for o in by_step["7"].outputs for k in o.get("data", {})].count("image/png") == 2
    run = tmp_path / "run"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "report.html").is_file()
    saved = tmp_path / "saved" / "sks-dog"
    assert sorted(p.name for p in saved.iterdir()) == ["pytorch_lora_weights.safetensors", "report.html",
                                                       "settings.json"]  # fmt: skip


def test_notebook_settings_fit_a_t4_with_sd3_medium(monkeypatch):
    """The notebook's own settings (its MEMORY_FLAGS and EXTRA_FLAGS, 1024 px, batch 1, validation) planned for
    SD3 Medium on a simulated free Colab T4: a plan is found and its predicted peaks keep to both budgets."""
    import re
    import shlex

    from sd3booth.cli import build_parser
    from sd3booth.config import build_config
    from sd3booth.models import placement
    from sd3booth.plan import choose
    from sd3booth.plan.calibration import load_calibration
    from sd3booth.plan.sizes import ModelSizes

    settings = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    values = dict(re.findall(r'^(\w+) = "([^"]*)"', settings, re.M))
    assert re.search(r"^RESOLUTION = 1024$", settings, re.M)
    n = 24  # SD3 Medium, as tests/test_budget.py describes it
    sd3m = ModelSizes(n_blocks=n, block_params=82_000_000, other_params=2_030_000_000 - n * 82_000_000, hidden=1536,
                      clip_l_params=124_000_000, clip_g_params=695_000_000, t5_params=4_760_000_000,
                      t5_layer_params=193_000_000, vae_params=84_000_000, t5_wo_params=24 * 4096 * 10240)  # fmt: skip
    monkeypatch.setattr(choose, "read_sizes", lambda root, variant=None: sd3m)
    argv = ["--pretrained_model_name_or_path", "a/b", "--instance_data_dir", "x", "--resolution", "1024",
            "--train_batch_size", "1", "--validation_prompt", "a photo of sks dog on a beach",
            *shlex.split(values["MEMORY_FLAGS"]), *shlex.split(values["EXTRA_FLAGS"])]  # fmt: skip
    ns, extra = build_parser()[1]["train"].parse_known_args(argv)
    assert not extra
    cfg = build_config(vars(ns))
    assert (cfg.mixed_precision, cfg.max_vram, cfg.max_ram) == ("fp16", 14.0, 11.0)
    t4 = placement.DeviceInfo(type="cuda", total_gib=14.58, bf16=False, name="Tesla T4", available_gib=14.3,
                              overhead_gib=0.45, ram_available_gib=11.7)  # fmt: skip
    place = placement.place_run(cfg, Path("."), t4)
    cal = load_calibration()
    assert place.mixed_precision == "fp16"
    assert place.memory.peak <= place.memory.allocator_cap_gib * cal["safety"] <= 14.0
    assert place.memory.host_peak <= 11.0
