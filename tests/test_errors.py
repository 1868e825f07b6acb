"""Bad input to ``sd3booth train``: one ``error: ...`` line on stderr, exit code 2, no traceback, nothing lost.

Every case runs the real CLI entry point (in-process through ``main``, two through ``python -m sd3booth``) on a
tiny random SD3 pipeline. One successful run (module-scoped) is shared: it is the "zero-byte image among good
ones" case, the "output folder holds another run" case and the cache the cache-safety cases check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import run_cli, run_quiet, tree_hashes

from sd3booth.data.dataset import write_demo_like_dataset

FAST = ["--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2", "--num_inference_steps", "2",
        "--report_to", "none", "--seed", "0"]  # fmt: skip


# ---- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """Tests never download anything (tests/conftest.py belongs to someone else, so it is set here too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="session")
def tiny_sd3(_offline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD3 pipeline (about 6 MB), written once per session."""
    from sd3booth.random_model import write_random_model

    return Path(write_random_model(tmp_path_factory.mktemp("tiny-sd3-errors"), "tiny", device="cpu"))


def train_args(model: Path | str, data: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--output_dir", str(out), *FAST, *extra]  # fmt: skip


def assert_user_error(rc: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, exactly one non-empty 'error: ' line on stderr (after any 'warning: ' lines naming skipped
    files) holding every needle, no traceback anywhere."""
    assert "Traceback" not in out + err, err
    assert rc == 2, f"exit code {rc}; stderr: {err!r}"
    lines = err.splitlines()
    assert all(x.startswith("warning: ") for x in lines[:-1]), f"stderr beyond warnings and one error: {err!r}"
    line = lines[-1]
    assert line.startswith("error: ") and line[len("error: ") :].strip(), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def malformed_dataset(root: Path, bad_line: int = 3) -> Path:
    """4 good images whose metadata.jsonl has invalid JSON on line ``bad_line``."""
    write_demo_like_dataset(root, n=4, size=64)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    lines[bad_line - 1] = '{"file_name": "toy_02.png", "caption": "unterminated}'
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@dataclass
class GoodRun:
    args: list[str]
    data: Path
    out: Path
    rc: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def good_run(tiny_sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> GoodRun:
    """One successful run: 4 good images plus one zero-byte image, a checkpoint at every step."""
    root = tmp_path_factory.mktemp("good-run")
    data = root / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    (data / "zero_bytes.png").write_bytes(b"")
    out = root / "run"
    args = train_args(tiny_sd3, data, out, "--checkpointing_steps", "1")
    rc, stdout, stderr = run_quiet(args)
    return GoodRun(args, data, out, rc, stdout, stderr)


def _ok(run: GoodRun) -> GoodRun:
    assert run.rc == 0, f"the shared good run failed: {run.stderr[-2000:]}"
    return run


# ---- data folder -------------------------------------------------------------------------------------------


def test_missing_data_folder(tiny_sd3, tmp_path, capsys):
    missing = tmp_path / "no-such-photos"
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(tiny_sd3, missing, out), capsys)
    assert_user_error(rc, o, e, str(missing), "--instance_data_dir")
    assert not out.exists(), "a settings error must write nothing"


def test_empty_data_folder(tiny_sd3, tmp_path, capsys):
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    rc, o, e = run_cli(train_args(tiny_sd3, empty, tmp_path / "out"), capsys)
    line = assert_user_error(rc, o, e, str(empty.resolve()))
    assert "no image files" in line


def test_every_image_unreadable(tiny_sd3, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "zero.png").write_bytes(b"")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 20)
    (photos / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    rc, o, e = run_cli(
        train_args(tiny_sd3, photos, tmp_path / "out", "--instance_prompt", "a photo of sks toy"), capsys
    )
    line = assert_user_error(rc, o, e, str(photos.resolve()))
    assert "no usable images" in line and "all 3 image file" in line
    for name in ("zero.png", "corrupt.jpg", "truncated.png"):  # each skipped file is named in a warning
        assert any(name in w and w.startswith("warning: ") for w in e.splitlines()), (name, e)


def test_one_zero_byte_image_among_good_ones_warns_and_trains(good_run):
    run = _ok(good_run)
    printed = run.stdout + run.stderr
    assert "Traceback" not in printed
    warnings = [line for line in printed.splitlines() if "warning" in line and "zero_bytes.png" in line]
    assert len(warnings) == 1, printed
    assert "empty" in warnings[0] or "0 bytes" in warnings[0]
    lora = run.out / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0
    assert "training 2 steps: 4 images" in run.stdout  # the bad file is not counted


def test_malformed_metadata_line(tiny_sd3, tmp_path, capsys):
    data = malformed_dataset(tmp_path / "photos", bad_line=3)
    rc, o, e = run_cli(train_args(tiny_sd3, data, tmp_path / "out"), capsys)
    line = assert_user_error(rc, o, e, "metadata.jsonl", "line 3")
    assert str(data.resolve() / "metadata.jsonl") in line
    assert "JSON" in line


def test_metadata_line_names_missing_file(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    with (data / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "gone.png", "caption": "a photo of sks toy"}) + "\n")
    rc, o, e = run_cli(train_args(tiny_sd3, data, tmp_path / "out"), capsys)
    line = assert_user_error(rc, o, e, "metadata.jsonl", "line 5", "gone.png")
    assert "does not exist" in line


def test_fewer_images_than_one_batch(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    rc, o, e = run_cli(train_args(tiny_sd3, data, tmp_path / "out", "--train_batch_size", "8"), capsys)
    line = assert_user_error(rc, o, e, "--train_batch_size 8")
    assert "4 usable image" in line


def test_repeats_count_towards_one_batch(good_run, tmp_path, capsys):
    run = _ok(good_run)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    out = tmp_path / "out"
    args = train_args(run.args[2], data, out, "--train_batch_size", "8", "--repeats", "2", "--max_train_steps", "1",
                      "--cache_dir", str(run.out / "cache"))  # fmt: skip
    rc, o, e = run_cli(args, capsys)
    assert rc == 0, e
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# ---- model path --------------------------------------------------------------------------------------------


def _empty_dir(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "empty-model"
    p.mkdir()
    return p, ["model_index.json"]


def _sdxl_dir(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "sdxl-model"
    p.mkdir()
    (p / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for comp in ("unet", "vae", "scheduler"):
        (p / comp).mkdir()
    return p, ["StableDiffusionXLPipeline", "SD3"]


def _nonexistent(tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "does" / "not" / "exist", ["not found"]


@pytest.mark.parametrize("make_model", [_empty_dir, _sdxl_dir, _nonexistent], ids=["empty-dir", "sdxl", "missing"])
def test_model_path_not_sd3(make_model, tmp_path, capsys):
    model, needles = make_model(tmp_path)
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(model, data, out), capsys)
    assert_user_error(rc, o, e, str(model), *needles)
    assert not out.exists(), "a model-path error must write nothing"


# ---- conflicting / unknown flags ---------------------------------------------------------------------------

CONFLICTS = {
    "both-data-sources": (["--dataset_name", "{data}"], ["--instance_data_dir", "--dataset_name"]),
    "8bit-adam-with-prodigy": (["--use_8bit_adam", "--optimizer", "prodigy"], ["--use_8bit_adam", "prodigy"]),
    "prior-without-class-dir": (["--with_prior_preservation", "--class_prompt", "a toy"], ["--class_data_dir"]),
    "prior-without-class-prompt": (
        ["--with_prior_preservation", "--class_data_dir", "{tmp}/class"],
        ["--class_prompt"],
    ),  # fmt: skip
    "resolution-not-multiple-of-16": (["--resolution", "100"], ["--resolution 100", "multiple of 16"]),
    "unknown-flag": (["--learnig_rate", "1e-4"], ["--learnig_rate", "did you mean --learning_rate"]),
    "unknown-flag-equals": (["--learnig_rate=1e-4"], ["--learnig_rate", "did you mean --learning_rate"]),
    "bad-choice": (["--lr_scheduler", "cosine_annealing"], ["--lr_scheduler", "cosine_annealing"]),
    "bad-int": (["--rank", "four"], ["--rank", "four"]),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_or_unknown_flags(case, tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    extra, needles = CONFLICTS[case]
    extra = [x.format(data=data, tmp=tmp_path) for x in extra]
    out = tmp_path / "out"
    rc, o, e = run_cli(train_args(tiny_sd3, data, out, *extra), capsys)
    assert_user_error(rc, o, e, *needles)
    assert not out.exists(), "a flag error must write nothing"


def test_bad_config_key_suggests_closest(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    cfg = tmp_path / "run.toml"
    cfg.write_text('rank = 8\nlearnig_rate = 1e-4\ninstance_prompt = "a photo of sks toy"\n')
    rc, o, e = run_cli(train_args(tiny_sd3, data, tmp_path / "out", "--config", str(cfg)), capsys)
    assert_user_error(rc, o, e, str(cfg), "learnig_rate", "did you mean learning_rate")


# ---- the output folder and the cache are never damaged by an error -----------------------------------------


def test_output_folder_holding_another_run_is_refused_and_untouched(good_run, capsys):
    run = _ok(good_run)
    before = tree_hashes(run.out)
    names = set(before)
    assert {"pytorch_lora_weights.safetensors", "settings.json", "metrics.jsonl"} <= names
    assert any(n.startswith("cache/text/") for n in names) and any(n.startswith("cache/latents/") for n in names)
    assert {"checkpoints/checkpoint-1/state.json", "checkpoints/checkpoint-2/state.json"} <= names
    rc, o, e = run_cli(run.args, capsys)  # the identical command again
    assert_user_error(rc, o, e, str(run.out), "--resume_from_checkpoint", "--overwrite_output_dir")
    assert tree_hashes(run.out) == before


def test_subprocess_second_identical_run_exits_2_without_traceback(good_run):
    run = _ok(good_run)
    before = tree_hashes(run.out)
    proc = subprocess.run([sys.executable, "-m", "sd3booth", *run.args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds another run" in lines[0], proc.stderr
    assert tree_hashes(run.out) == before


def test_subprocess_unknown_flag_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd3booth", "train", "--learnig_rate", "1e-4"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)  # fmt: skip
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--learning_rate" in lines[0], proc.stderr


def _bad_metadata(run: GoodRun, tmp: Path) -> tuple[list[str], list[str]]:
    data = malformed_dataset(tmp / "photos-bad", bad_line=2)
    return ["--instance_data_dir", str(data)], ["metadata.jsonl", "line 2"]


def _bad_lora_layers(run: GoodRun, tmp: Path) -> tuple[list[str], list[str]]:
    """An error raised only after the cache stages ran (they find everything cached)."""
    return ["--instance_data_dir", str(run.data), "--lora_layers", "attn.no_such_proj"], ["attn.no_such_proj"]


@pytest.mark.parametrize("make_case", [_bad_metadata, _bad_lora_layers], ids=["bad-metadata", "bad-lora-layers"])
def test_failing_run_leaves_shared_cache_unchanged(make_case, good_run, tmp_path, capsys):
    run = _ok(good_run)
    cache = run.out / "cache"
    before = tree_hashes(cache)
    assert len(before) >= 9  # 5 caption embeddings + 4 latents
    extra, needles = make_case(run, tmp_path)
    args = ["train", "--pretrained_model_name_or_path", run.args[2], "--output_dir", str(tmp_path / "other"),
            "--cache_dir", str(cache), *FAST, *extra]  # fmt: skip
    rc, o, e = run_cli(args, capsys)
    assert_user_error(rc, o, e, *needles)
    assert tree_hashes(cache) == before


def test_failed_run_does_not_block_the_retry(good_run, tmp_path, capsys):
    run = _ok(good_run)
    data = tmp_path / "photos"
    data.mkdir()  # empty: the first attempt fails
    out = tmp_path / "out"
    args = train_args(run.args[2], data, out, "--cache_dir", str(run.out / "cache"), "--max_train_steps", "1")
    rc, o, e = run_cli(args, capsys)
    assert_user_error(rc, o, e, "no image files")
    write_demo_like_dataset(data, n=4, size=64)  # the user fixes the data and runs the same command again
    rc, o, e = run_cli(args, capsys)
    assert rc == 0, e
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "flags", [["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]], ids=["overwrite", "resume"]
)
def test_bad_data_error_keeps_previous_run(flags, good_run, tmp_path, capsys):
    run = _ok(good_run)
    out = tmp_path / "run-copy"
    shutil.copytree(run.out, out)
    before = tree_hashes(out)
    data = malformed_dataset(tmp_path / "photos-bad", bad_line=2)
    rc, o, e = run_cli(train_args(run.args[2], data, out, *flags), capsys)
    assert_user_error(rc, o, e, "metadata.jsonl", "line 2")
    assert tree_hashes(out) == before


def test_resume_from_nonexistent_checkpoint(good_run, tmp_path, capsys):
    run = _ok(good_run)
    out = tmp_path / "run-copy"
    shutil.copytree(run.out, out)
    before = tree_hashes(out)
    rc, o, e = run_cli(train_args(run.args[2], run.data, out, "--resume_from_checkpoint", "/nonexistent/path"), capsys)
    assert_user_error(rc, o, e, "--resume_from_checkpoint", "/nonexistent/path")
    assert tree_hashes(out) == before


def test_resume_from_nonexistent_checkpoint_fresh_output(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    rc, o, e = run_cli(train_args(tiny_sd3, data, tmp_path / "out", "--resume_from_checkpoint", "/nonexistent/path"),
                       capsys)  # fmt: skip
    assert_user_error(rc, o, e, "/nonexistent/path")


# ---- paths that cannot be folders --------------------------------------------------------------------------


def test_output_dir_below_a_file(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, o, e = run_cli(train_args(tiny_sd3, data, blocker / "run"), capsys)
    assert_user_error(rc, o, e, str(blocker))


def test_cache_dir_is_a_file(good_run, tmp_path, capsys):
    run = _ok(good_run)
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=3, size=48, seed=7)  # nothing of it is cached anywhere
    rc, o, e = run_cli(train_args(run.args[2], data, tmp_path / "out", "--cache_dir", str(blocker)), capsys)
    assert_user_error(rc, o, e, str(blocker), "--cache_dir")
