"""Every failure a user can cause or meet ends in one line, exit code 2 (130 for Ctrl-C), no traceback, and
leaves what was saved before as it was (issue #9; the older bad-input cases are in test_errors.py).

Each case drives the real CLI entry point on a tiny random SD3 pipeline, in-process through ``main``, or as
``python -m sd3booth`` where a process must really die. Conditions that a test cannot create for real are
made by patching the one function that meets them:

- a read-only mount: ``os.access`` and ``os.statvfs`` report it for one folder (tests run as root, where
  chmod stops nothing); a real immutable folder (``chattr +i``, which stops root too) where chattr works;
  and an EROFS error raised by the first write of the run, for the top-level mapping;
- a full disk: ``shutil.disk_usage`` reports almost no free space;
- out of memory, Ctrl-C, a missing package, no network: the exception raised where it would be.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli, run_quiet, tree_hashes

from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import explain
from sd3booth.train import checkpoint, resume

FAST = ["--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2", "--num_inference_steps", "2",
        "--report_to", "none", "--seed", "0", "--checkpointing_steps", "1"]  # fmt: skip
README = Path(__file__).resolve().parents[1] / "README.md"


# ---- helpers -----------------------------------------------------------------------------------------------


def train_args(model: Path | str, data: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--output_dir", str(out), *FAST, *extra]  # fmt: skip


def one_line(rc: int, out: str, err: str, *needles: str, code: int = 2, prefix: str = "error: ") -> str:
    """Exit ``code``, no traceback, stderr = warnings then exactly one line starting with ``prefix`` that holds
    every needle; returns that line."""
    assert "Traceback" not in out + err, err
    assert rc == code, f"exit code {rc}; stderr: {err[-3000:]!r}"
    lines = [x.split("\r")[-1] for x in err.splitlines()]  # a progress bar redraws its line with \r
    lines = [x for x in lines if x.strip() and not x.startswith("train:")]
    assert all(x.startswith("warning: ") for x in lines[:-1]), f"stderr beyond warnings and one line: {err!r}"
    line = lines[-1]
    assert line.startswith(prefix) and len(line) > len(prefix), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def temporaries(root: Path) -> list[str]:
    """Hidden leftovers of interrupted writes anywhere under root."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if not p.name.startswith(".git"))


@dataclass
class Run:
    model: Path
    data: Path
    out: Path
    args: list[str]


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (4 images, rank 4, batch 1)."""
    root = tmp_path_factory.mktemp("reliability")
    data = root / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    out = root / "run"
    args = train_args(tiny_model, data, out)
    rc, o, e = run_quiet(args)
    assert rc == 0, e[-3000:]
    return Run(Path(tiny_model), data, out, args)


@pytest.fixture
def run_copy(first_run: Run, tmp_path: Path) -> Run:
    """A private copy of the first run's output folder (cache included) to resume or damage."""
    out = tmp_path / "run"
    shutil.copytree(first_run.out, out)
    return Run(first_run.model, first_run.data, out, train_args(first_run.model, first_run.data, out))


def photos(tmp_path: Path, n: int = 4) -> Path:
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=n, size=64)
    return data


# ---- folders that cannot be written ------------------------------------------------------------------------


def test_output_folder_on_a_read_only_mount(tiny_model, tmp_path, capsys, monkeypatch):
    data = photos(tmp_path)
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    def access(path, mode, *a, **k):
        return False if Path(path) == mount and mode & os.W_OK else real_access(path, mode, *a, **k)

    def statvfs(path):
        st = real_statvfs(path)
        return namedtuple("st", "f_flag")(st.f_flag | os.ST_RDONLY) if Path(path) == mount else st

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "statvfs", statvfs)
    rc, o, e = run_cli(train_args(tiny_model, data, mount / "run"), capsys)
    one_line(rc, o, e, "--output_dir", str(mount), "read-only file system")
    assert list(mount.iterdir()) == []


def test_output_folder_immutable_for_real(tiny_model, tmp_path, capsys):
    """chattr +i stops even root; skipped where the container may not set it."""
    data = photos(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        rc, o, e = run_cli(train_args(tiny_model, data, locked / "run"), capsys)
        one_line(rc, o, e, "--output_dir", str(locked), "cannot write")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert list(locked.iterdir()) == []


def test_write_failing_with_erofs_mid_run_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    """A folder that looks writable but whose first write fails (a mount turned read-only): the top-level
    mapping names the path."""
    data = photos(tmp_path)
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, o, e = run_cli(train_args(tiny_model, data, out), capsys)
    one_line(rc, o, e, "Read-only file system", str(out), "writable disk")
    assert not out.exists()


# ---- config files ------------------------------------------------------------------------------------------

CONFIGS = {
    "non-utf8": ("run.toml", b"rank = 8\n# caf\xe9\n", ["not UTF-8", "0xe9", "save it as UTF-8"]),
    "json-list": ("run.json", b'[{"rank": 8}]', ["holds a list", "not a table of settings"]),
    "yaml-suffix": ("run.yaml", b"rank: 8\nlearning_rate: 1e-4\n", ["YAML", "TOML"]),
    "yaml-as-toml": ("run.toml", b"rank: 8\nlearning_rate: 1e-4\n", ["not valid TOML", "looks like YAML"]),
    "folder": ("conf.d", None, ["is a folder"]),
    "empty-json": ("run.json", b"", ["not valid JSON"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_file(case, tiny_model, tmp_path, capsys):
    name, content, needles = CONFIGS[case]
    cfg = tmp_path / name
    cfg.mkdir() if content is None else cfg.write_bytes(content)
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), out, "--config", str(cfg)), capsys)
    one_line(rc, o, e, str(cfg), *needles)
    assert not out.exists()


# ---- flags -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, suggestion",
    [("--learning_rat", "--learning_rate"), ("--center", "--center_crop"), ("--max_train", "--max_train_steps")],
)
def test_abbreviated_flag_is_refused_and_names_the_flag(flag, suggestion, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), out, flag, "1"), capsys)
    one_line(rc, o, e, f"unknown flag {flag}", suggestion)
    assert not out.exists()


def test_abbreviated_flag_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "sd3booth", "train", "--learning_rat", "1e-4"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    one_line(proc.returncode, proc.stdout, proc.stderr, "--learning_rat", "did you mean --learning_rate")


def test_bad_num_cpu_threads(tiny_model, tmp_path, capsys):
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), tmp_path / "o", "--num_cpu_threads", "0"), capsys)
    one_line(rc, o, e, "--num_cpu_threads")


# ---- the cache ---------------------------------------------------------------------------------------------


def test_truncated_and_empty_cache_entries_are_named_deleted_and_rebuilt(first_run, tmp_path, capsys):
    from safetensors.torch import load

    cache = tmp_path / "cache"
    shutil.copytree(first_run.out / "cache", cache)
    latents = sorted((cache / "latents").glob("*.safetensors"))
    texts = sorted((cache / "text").glob("*.safetensors"))
    good = {p: p.read_bytes() for p in (latents[0], texts[0])}
    latents[0].write_bytes(good[latents[0]][: len(good[latents[0]]) // 2])  # truncated
    texts[0].write_bytes(b"")  # empty
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(first_run.model, first_run.data, out, "--cache_dir", str(cache)), capsys)
    assert rc == 0 and "Traceback" not in o + e, e
    warnings = [x for x in e.splitlines() if x.startswith("warning: cache entry")]
    assert len(warnings) == 2, e
    for p in good:
        assert any(str(p) in w and "damaged" in w and "deleted" in w for w in warnings), (p, warnings)
        rebuilt, original = load(p.read_bytes()), load(good[p])  # batching may change the last bits
        assert rebuilt.keys() == original.keys()
        assert all(torch.allclose(rebuilt[k], original[k], atol=1e-4) for k in original), p
    assert "encoding 1 caption(s)" in o and "encoding 1 latent(s)" in o
    assert not temporaries(cache)


def test_cache_entry_with_wrong_shape_is_not_trusted(first_run, tmp_path, capsys):
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    shutil.copytree(first_run.out / "cache", cache)
    victim = sorted((cache / "text").glob("*.safetensors"))[0]
    save_file({"prompt_embeds": torch.zeros(3, 3)}, victim)  # readable, but neither shape nor names fit
    rc, o, e = run_cli(train_args(first_run.model, first_run.data, tmp_path / "o", "--cache_dir", str(cache)), capsys)
    assert rc == 0, e
    assert f"warning: cache entry {victim} is damaged" in e


def test_cache_entry_damaged_after_the_check_is_one_line(tmp_path):
    """get() on a damaged entry (damaged between the check and the read): one UserError naming the file, and
    the entry is gone so the next run encodes it again."""
    from sd3booth.cache.store import TensorStore
    from sd3booth.errors import UserError

    store = TensorStore(tmp_path)
    store.put("k", {"a": torch.ones(4)})
    store.path("k").write_bytes(store.path("k").read_bytes()[:20])
    with pytest.raises(UserError, match="cache entry .*k.safetensors is damaged") as info:
        store.get("k")
    assert "\n" not in str(info.value) and not store.path("k").exists()


# ---- generate ----------------------------------------------------------------------------------------------


def gen_args(*extra: str) -> list[str]:
    return ["generate", "--prompt", "sks toy", "--num_images", "1", "--num_inference_steps", "1", *extra]


def test_generate_resolution_not_a_multiple_of_16(first_run, tmp_path, capsys):
    lora = first_run.out / "pytorch_lora_weights.safetensors"
    rc, o, e = run_cli(gen_args("--lora", str(lora), "--resolution", "100", "--output_dir", str(tmp_path)), capsys)
    one_line(rc, o, e, "--resolution 100", "multiple of 16")


def test_generate_resolution_larger_than_the_position_embedding(first_run, tmp_path, capsys):
    lora = first_run.out / "pytorch_lora_weights.safetensors"
    rc, o, e = run_cli(gen_args("--lora", str(lora), "--resolution", "1024", "--output_dir", str(tmp_path)), capsys)
    one_line(rc, o, e, "--resolution 1024", "512")  # the tiny model covers 32 patches x 2 x 8 = 512 px


def test_generate_default_resolution_fits_the_model(first_run, tmp_path, capsys):
    """A LoRA without settings.json beside it: the default is the model's native size (256 for the tiny
    model), not 1024, which its position embedding does not cover. --lora may also name a folder."""
    alone = tmp_path / "lora-alone"
    alone.mkdir()
    shutil.copy(first_run.out / "pytorch_lora_weights.safetensors", alone)
    out = tmp_path / "gen"
    rc, o, e = run_cli(gen_args("--lora", str(alone), "--pretrained_model_name_or_path", str(first_run.model),
                                "--output_dir", str(out)), capsys)  # fmt: skip
    assert rc == 0, e
    from PIL import Image

    (png,) = out.glob("*.png")
    assert Image.open(png).size == (256, 256)


def test_generate_missing_lora_says_so(tmp_path, capsys):
    missing = tmp_path / "nope" / "pytorch_lora_weights.safetensors"
    rc, o, e = run_cli(gen_args("--lora", str(missing)), capsys)
    line = one_line(rc, o, e, "--lora", str(missing), "does not exist")
    assert "base model" not in line


def test_generate_folder_without_lora(tmp_path, capsys):
    rc, o, e = run_cli(gen_args("--lora", str(tmp_path)), capsys)
    one_line(rc, o, e, "--lora", "is a folder without pytorch_lora_weights.safetensors")


def test_generate_damaged_lora(first_run, tmp_path, capsys):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes((first_run.out / lora.name).read_bytes()[:-10])
    rc, o, e = run_cli(gen_args("--lora", str(lora), "--pretrained_model_name_or_path", str(first_run.model)), capsys)
    one_line(rc, o, e, str(lora), "damaged")


def test_damaged_model_weights(first_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(first_run.model, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(model, first_run.data, out), capsys)
    one_line(rc, o, e, f"model file {weights} is damaged", "download or copy the model again")
    assert not out.exists()


def test_generate_lora_without_settings_needs_a_model(first_run, tmp_path, capsys):
    """No settings.json beside the LoRA and no base model in its header (a file from another tool)."""
    from safetensors.torch import load_file, save_file

    save_file(
        load_file(first_run.out / "pytorch_lora_weights.safetensors"), tmp_path / "pytorch_lora_weights.safetensors"
    )
    rc, o, e = run_cli(gen_args("--lora", str(tmp_path / "pytorch_lora_weights.safetensors")), capsys)
    one_line(rc, o, e, "no base model", "--pretrained_model_name_or_path")


# ---- the hub and the network -------------------------------------------------------------------------------


def test_hub_model_offline(tmp_path, capsys):
    rc, o, e = run_cli(train_args("someone/some-sd3-model", photos(tmp_path), tmp_path / "o"), capsys)
    one_line(rc, o, e, "someone/some-sd3-model", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("error", ["GatedRepoError", "RuntimeError"])
def test_hub_error_names_the_current_login_command(error, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise type(error, (Exception,), {})("nope")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    rc, o, e = run_cli(train_args("someone/some-sd3-model", photos(tmp_path), tmp_path / "o"), capsys)
    line = one_line(rc, o, e, "someone/some-sd3-model", "hf auth login")
    assert "huggingface-cli" not in line


def test_no_network_mid_run(tiny_model, tmp_path, capsys, monkeypatch):
    from sd3booth.models import loaders

    def fail(*a, **k):
        raise ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(loaders, "load_text_encoder", fail)
    out = tmp_path / "o"
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), out), capsys)
    one_line(rc, o, e, "no network")
    assert not (out / "settings.json").exists()


# ---- resume is strict about what defines the run -----------------------------------------------------------


def test_every_setting_is_classified_for_resume():
    assert resume.unclassified() == []


def test_readme_lists_the_settings_a_resume_may_change():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Resuming") :]
    section = section[: section.index("\n## ")]
    missing = [n for n in resume.MAY_CHANGE if f"--{n}" not in section]
    assert not missing, f"README's resume section does not name {missing}"


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--rank", "8"], ["--rank 4 -> 8"]),
        (["--train_batch_size", "2"], ["--train_batch_size 1 -> 2"]),
        (["--rank", "8", "--lora_alpha", "2", "--gradient_accumulation_steps", "2"],
         ["--rank 4 -> 8", "--lora_alpha 4 -> 2", "--gradient_accumulation_steps 1 -> 2"]),
        (["--lora_layers", "attn.to_q,attn.to_k"], ["--lora_layers"]),
        (["--resolution", "32"], ["--resolution 64 -> 32"]),
        (["--optimizer", "prodigy"], ["--optimizer adamw -> prodigy"]),
    ],
    ids=["rank", "batch", "several", "targets", "resolution", "optimizer"],
)  # fmt: skip
def test_resume_with_a_run_defining_change_stops_and_touches_nothing(extra, needles, run_copy, capsys):
    before = tree_hashes(run_copy.out)
    rc, o, e = run_cli([*run_copy.args, "--resume_from_checkpoint", "latest", *extra], capsys)
    line = one_line(rc, o, e, "checkpoint-2", "other settings", *needles)
    assert line.count("->") == len(needles)
    assert tree_hashes(run_copy.out) == before, "a refused resume changes nothing, settings.json included"


@pytest.mark.parametrize("change", ["more-images", "other-caption"])
def test_resume_on_other_data_stops(change, run_copy, tmp_path, capsys):
    data = tmp_path / "photos2"
    shutil.copytree(run_copy.data, data)
    if change == "more-images":
        write_demo_like_dataset(tmp_path / "extra", n=5, size=64)
        shutil.copy(tmp_path / "extra" / "toy_04.png", data / "toy_04.png")
        needle = "dataset 4 -> 5 images"
    else:
        lines = (data / "metadata.jsonl").read_text().splitlines()
        lines[0] = lines[0].replace("sks", "zzz")
        (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        needle = "dataset content"
    before = tree_hashes(run_copy.out)
    args = train_args(run_copy.model, data, run_copy.out, "--resume_from_checkpoint", "latest",
                      "--instance_prompt", "a photo of sks toy")  # fmt: skip
    rc, o, e = run_cli(args, capsys)
    one_line(rc, o, e, needle)
    assert tree_hashes(run_copy.out) == before


def test_resume_with_a_new_learning_rate_uses_and_records_it(run_copy, capsys):
    args = [*run_copy.args, "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4", "--max_train_steps", "4",
            "--logging_steps", "1"]  # fmt: skip
    rc, o, e = run_cli(args, capsys)
    assert rc == 0, e
    metrics = [json.loads(x) for x in (run_copy.out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics if m["step"] > 2] == [5e-4, 5e-4], "the new rate is the one used"
    record = json.loads((run_copy.out / "settings.json").read_text())
    assert record["settings"]["learning_rate"] == 5e-4 and record["settings"]["max_train_steps"] == 4
    assert record["step"] == 4 and record["finished"] is True
    first, second = record["history"]
    assert first["step"] == 0 and second["step"] == 2
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["changed"] == {"learning_rate": [1e-4, 5e-4], "max_train_steps": [2, 4], "logging_steps": [10, 1]}


def test_resume_from_a_damaged_checkpoint(run_copy, capsys):
    lora = run_copy.out / "checkpoints" / "checkpoint-2" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])
    before = tree_hashes(run_copy.out)
    rc, o, e = run_cli([*run_copy.args, "--resume_from_checkpoint", "latest"], capsys)
    one_line(rc, o, e, "checkpoint-2 is damaged", "lora.safetensors", "checkpoint-1")
    assert tree_hashes(run_copy.out) == before


def test_resume_from_a_checkpoint_with_a_truncated_trainer_state(run_copy, capsys):
    state = run_copy.out / "checkpoints" / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-40])
    rc, o, e = run_cli([*run_copy.args, "--resume_from_checkpoint", "latest"], capsys)
    one_line(rc, o, e, "checkpoint-2 is damaged", "trainer_state.pt")


def test_checkpoints_without_settings_json_are_another_run(run_copy, capsys):
    """A run killed between its first checkpoint and settings.json: the same command must not start over it."""
    (run_copy.out / "settings.json").unlink()
    before = tree_hashes(run_copy.out)
    rc, o, e = run_cli(run_copy.args, capsys)
    one_line(rc, o, e, "holds another run", "--resume_from_checkpoint latest")
    assert tree_hashes(run_copy.out) == before


# ---- runs that fail part-way: no settings.json, nothing half-written ---------------------------------------


def test_out_of_gpu_memory(tiny_model, tmp_path, capsys, monkeypatch):
    from sd3booth.models import loaders

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 8 GiB total)")

    monkeypatch.setattr(loaders, "load_transformer", oom)
    out = tmp_path / "out"
    args = train_args(tiny_model, photos(tmp_path), out)
    rc, o, e = run_cli(args, capsys)
    one_line(rc, o, e, "out of GPU memory", "--max_vram")
    assert not (out / "settings.json").exists(), "a failed run never writes settings.json"
    monkeypatch.undo()
    rc, o, e = run_cli(args, capsys)  # the same command again just works: nothing claims the folder
    assert rc == 0, e


def test_out_of_cpu_memory(tiny_model, tmp_path, capsys, monkeypatch):
    from sd3booth.models import loaders

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loaders, "load_transformer", oom)
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), tmp_path / "o"), capsys)
    one_line(rc, o, e, "out of memory")


def test_ctrl_c_while_writing_a_checkpoint(tiny_model, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside the second checkpoint write: exit 130, one line, checkpoint-1 and settings.json intact,
    no temporary folder; resuming continues from checkpoint-1."""
    out = tmp_path / "out"
    args = train_args(tiny_model, photos(tmp_path), out)
    real_save, calls = torch.save, []

    def save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    rc, o, e = run_cli(args, capsys)
    one_line(rc, o, e, "interrupted", "--resume_from_checkpoint latest", code=130, prefix="interrupted")
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["checkpoint-1"]
    assert checkpoint.damage(out / "checkpoints" / "checkpoint-1") is None
    assert json.loads((out / "settings.json").read_text())["step"] == 1
    assert not temporaries(out)
    rc, o, e = run_cli([*args, "--resume_from_checkpoint", "latest"], capsys)
    assert rc == 0 and "resumed from" in o, e


def test_disk_full_before_a_checkpoint(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        return u._replace(free=2**20) if "checkpoints" in str(path) else u

    monkeypatch.setattr(shutil, "disk_usage", usage)
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), out), capsys)
    one_line(rc, o, e, "not enough free space", "checkpoint-1", "--resume_from_checkpoint latest")
    assert checkpoint.checkpoints(out / "checkpoints") == [] and not temporaries(out)
    assert not (out / "settings.json").exists()


def test_disk_full_while_caching(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**20) if "cache" in str(p) else real(p))
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), out, "--cache_dir", str(cache)), capsys)
    one_line(rc, o, e, "not enough free space", str(cache), "--cache_dir")
    assert not list(cache.rglob("*.safetensors")) and not temporaries(cache)
    assert not (out / "settings.json").exists()


def test_disk_full_error_from_the_os_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    """ENOSPC from a write the free-space check did not foresee (another process filled the disk)."""
    from sd3booth.train import settings as run_settings

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "settings.json"))

    monkeypatch.setattr(run_settings, "atomic_write_bytes", full)
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), tmp_path / "out"), capsys)
    one_line(rc, o, e, "disk full", "settings.json", "--resume_from_checkpoint latest")


# ---- missing packages, unexpected errors, --debug ----------------------------------------------------------


def test_missing_optimizer_package_before_anything_is_written(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    out = tmp_path / "out"
    args = train_args(tiny_model, photos(tmp_path), out, "--optimizer", "prodigy")
    rc, o, e = run_cli(args, capsys)
    one_line(rc, o, e, "--optimizer prodigy", "pip install prodigyopt")
    assert not out.exists()


def test_missing_package_met_mid_run(tiny_model, tmp_path, capsys, monkeypatch):
    from sd3booth.models import loaders

    def missing(*a, **k):
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")

    monkeypatch.setattr(loaders, "load_text_encoder", missing)
    rc, o, e = run_cli(train_args(tiny_model, photos(tmp_path), tmp_path / "o"), capsys)
    one_line(rc, o, e, "missing package 'sentencepiece'", "pip install sentencepiece")


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tiny_model, tmp_path, capsys, monkeypatch):
    from sd3booth.models import loaders

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(loaders, "load_text_encoder", bug)
    args = train_args(tiny_model, photos(tmp_path), tmp_path / "o")
    rc, o, e = run_cli(args, capsys)
    one_line(rc, o, e, "unexpected ZeroDivisionError", "--debug", code=1)
    rc, o, e = run_cli([*args, "--debug"], capsys)
    assert rc == 1 and "Traceback" in e and e.strip().splitlines()[-1].startswith("error: unexpected")


@pytest.mark.parametrize(
    "exc, code, needles",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/y"), 2, ["disk full", "/x/y"]),
        (OSError(errno.EACCES, "Permission denied", "/x/y"), 2, ["no permission", "/x/y"]),
        (OSError(errno.EROFS, "Read-only file system", "/x"), 2, ["Read-only", "/x"]),
        (PermissionError(errno.EPERM, "Operation not permitted", "/x"), 2, ["no permission"]),
        (MemoryError(), 2, ["out of memory"]),
        (ModuleNotFoundError("No module named 'yaml'", name="yaml"), 2, ["pip install pyyaml"]),
        (ImportError("cannot import name 'X' from 'diffusers'"), 2, ["does not fit", "pip install"]),
        (ConnectionError("reset"), 2, ["no network"]),
        (KeyboardInterrupt(), 130, ["interrupted"]),
        (ValueError("a\nb"), 1, ["unexpected ValueError: a", "--debug"]),
    ],
)  # fmt: skip
def test_explain_maps_each_failure_to_one_line(exc, code, needles):
    got, line = explain(exc)
    assert got == code and "\n" not in line
    for n in needles:
        assert n in line, (n, line)


# ---- temporaries of interrupted writes ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temporaries_are_cleaned_at_the_next_start(run_copy, capsys):
    out = run_copy.out
    (out / "checkpoints" / ".checkpoint-3-abcd1234").mkdir()
    (out / "checkpoints" / ".checkpoint-3-abcd1234" / "lora.safetensors").write_bytes(b"half")
    (out / ".ckpt-lora-xyz").mkdir()
    latents = out / "cache" / "latents"
    dead = latents / f".{'0' * 32}.{_dead_pid()}-qwerty12.tmp"
    dead.write_bytes(b"half")
    live = latents / f".{'1' * 32}.{os.getpid()}-qwerty12.tmp"  # a live writer sharing the cache: kept
    live.write_bytes(b"being written")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # an append torn by the kill
    rc, o, e = run_cli([*run_copy.args, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"], capsys)
    assert rc == 0, e
    assert temporaries(out) == [f"cache/latents/{live.name}"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]


def test_kill_9_during_checkpoint_writes_then_resume(tiny_model, tmp_path):
    """A real kill -9 while a run writes a checkpoint every step: every complete checkpoint is sound, and
    the resumed run removes the leftovers and finishes."""
    data = photos(tmp_path)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sd3booth", *train_args(tiny_model, data, out, "--max_train_steps", "100000")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(checkpoint.checkpoints(out / "checkpoints")) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.02)
        time.sleep(0.013)  # somewhere inside the next write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = checkpoint.checkpoints(out / "checkpoints")
    assert len(done) >= 4
    for c in done:
        assert checkpoint.damage(c) is None, c
    last = int(done[-1].name.split("-")[1])
    rc, o, e = run_quiet(train_args(tiny_model, data, out, "--resume_from_checkpoint", "latest",
                                    "--max_train_steps", str(last + 1)))  # fmt: skip
    assert rc == 0, e
    assert temporaries(out) == []
    assert json.loads((out / "settings.json").read_text())["step"] == last + 1


# ---- CPU threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usable, logical, physical, busy, want",
    [
        (2, 2, 2, 1.0, 1),  # the machine: 2 cores, another process busy on one
        (2, 2, 2, 0.0, 2),
        (16, 16, 8, 0.0, 8),  # hyper-threads: physical cores
        (4, 64, 32, 0.0, 2),  # an affinity mask of 4 hyper-threads = 2 cores
        (64, 64, 64, 0.0, 8),  # capped
        (64, 64, 64, 60.0, 4),  # others keep 60 cores busy
        (4, 4, None, 9.0, 1),  # at least one
        (8, 128, 128, 100.0, 2),  # a container's 8 CPUs on a busy 128-CPU host: its share of the host's load
    ],
)
def test_default_thread_count(usable, logical, physical, busy, want):
    from sd3booth.models import threads as cpu

    assert cpu.pick_threads(usable, logical, physical, busy) == want


def test_num_cpu_threads_flag_sets_torch(first_run, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        rc, o, e = run_cli(train_args(first_run.model, first_run.data, tmp_path / "o", "--max_train_steps", "1",
                                      "--num_cpu_threads", "1", "--cache_dir", str(first_run.out / "cache")),
                           capsys)  # fmt: skip
        assert rc == 0, e
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_run_uses_the_default_thread_count(first_run, tmp_path, capsys):
    from sd3booth.models import threads as cpu

    before = torch.get_num_threads()
    torch.set_num_threads(cpu.default_threads() + 1)  # torch's own default on a bigger machine
    try:
        rc, o, e = run_cli(train_args(first_run.model, first_run.data, tmp_path / "o", "--max_train_steps", "1",
                                      "--cache_dir", str(first_run.out / "cache")), capsys)  # fmt: skip
        assert rc == 0, e
        assert torch.get_num_threads() == cpu.default_threads()
    finally:
        torch.set_num_threads(before)
