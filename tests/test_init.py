"""`sd3booth init`: answered through stdin, with --yes, and once in a real terminal (tmux) as a person would; the
file it writes is loaded through sd3booth.config exactly as `sd3booth train --config` loads it."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sd3booth import init_wizard
from sd3booth.cli import build_parser, main
from sd3booth.config import build_config
from sd3booth.data.dataset import scan_images, write_demo_like_dataset
from sd3booth.models import placement

T4 = placement.DeviceInfo(type="cuda", index=0, total_gib=14.58, bf16=False, name="Tesla T4")


def _answer(monkeypatch, lines: list[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))


def _load(path: Path):
    """The way `sd3booth train --config PATH` reads it: the train parser, then sd3booth.config.build_config."""
    _root, subs = build_parser()
    ns, extra = subs["train"].parse_known_args(["--config", str(path)])
    assert not extra
    return build_config(vars(ns))


def test_init_through_stdin_asks_again_until_answers_make_sense(tiny_model, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "my photos"
    write_demo_like_dataset(photos, n=3, size=96)
    Image.new("RGB", (96, 128), "white").save(photos / "tall.png")  # no caption: takes the instance prompt
    (photos / "side.txt").write_text("zwx toy from the side")
    Image.new("RGB", (160, 90), "grey").save(photos / "side.png")  # captioned by its .txt
    _answer(monkeypatch, [
        "no/such/model/here", str(tiny_model),  # not a model, then the tiny one
        str(tmp_path / "missing"), str(photos),  # no such folder, then the photos
        "zwx", 'toy"', "toy",  # a quote is refused
        "lots", "",  # not a number, then the detected default
        "7", "1",  # no goal 7; the quick test
    ])  # fmt: skip
    assert main(["init", str(tmp_path / "project")]) == 0
    out = capsys.readouterr().out
    for expected in (
        "neither an existing folder or file nor a hub id",
        "does not exist",
        "found 5 image(s): sizes 96x96 to 160x90, smallest side 90 px",
        "aspect ratios: 1:1 square x3, 16:9 landscape x1, 3:4 portrait x1",
        "captions: 3 from metadata.jsonl, 1 from .txt files, 1 use the instance prompt",
        "without quotes",
        "'lots' is not a number of GiB",
        "answer 1, 2 or 3",
    ):
        assert expected in out, expected
    target = tmp_path / "project" / "sd3booth.toml"
    assert f"sd3booth train --config {shlex.quote(str(target))}" in out.splitlines()[-1]
    cfg = _load(target)
    assert cfg.pretrained_model_name_or_path == str(Path(tiny_model).resolve())
    assert cfg.instance_data_dir == str(photos.resolve()) and cfg.instance_prompt == "a photo of zwx toy"
    assert (cfg.resolution, cfg.rank, cfg.max_train_steps, cfg.learning_rate) == (512, 4, 200, 4e-4)
    assert cfg.validation_prompt == "a photo of zwx toy on a beach" and cfg.validation_steps == 50
    assert cfg.output_dir == str(tmp_path / "project" / "output") and cfg.mixed_precision is None
    assert not cfg.with_prior_preservation  # offered, commented out
    text = target.read_text()
    assert '# with_prior_preservation = true\n# class_data_dir = "' in text
    assert "# found 5 image(s)" in text and "# ---- goal: quick test" in text
    # every caption the run will use is the one the wizard described
    sources = {ex.id: ex.caption for ex in scan_images(photos, instance_prompt=cfg.instance_prompt)}
    assert sources["tall.png"] == "a photo of zwx toy" and sources["side.png"] == "zwx toy from the side"


def test_init_yes_takes_every_default_and_plans_for_the_detected_t4(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(placement, "detect_device", lambda device=None: T4)
    write_demo_like_dataset(tmp_path / "photos", n=2, size=64)
    assert main(["init", str(tmp_path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "found Tesla T4 with 14.6 GiB" in out
    cfg = _load(tmp_path / "sd3booth.toml")
    assert cfg.pretrained_model_name_or_path == init_wizard.DEFAULT_MODEL
    assert (cfg.max_vram, cfg.mixed_precision) == (14.0, "fp16")  # 14.58 GiB less the CUDA context; no bf16
    assert (cfg.resolution, cfg.rank, cfg.max_train_steps, cfg.instance_prompt) == (1024, 16, 600, "a photo of sks dog")
    assert "accept its licence" in (tmp_path / "sd3booth.toml").read_text()
    # a second --yes does not replace the file (the default answer is no): one line, exit 2
    before = (tmp_path / "sd3booth.toml").read_text()
    assert main(["init", str(tmp_path), "--yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; remove it" in err[0]
    assert (tmp_path / "sd3booth.toml").read_text() == before
    # --yes cannot invent photos
    assert main(["init", str(tmp_path / "empty"), "--yes"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_init_end_of_input_takes_the_remaining_defaults(tmp_path, monkeypatch, capsys):
    write_demo_like_dataset(tmp_path / "photos", n=2, size=64)
    _answer(monkeypatch, [init_wizard.DEFAULT_MODEL])  # then the input ends
    assert main(["init", str(tmp_path)]) == 0
    assert "end of input" in capsys.readouterr().out
    assert _load(tmp_path / "sd3booth.toml").max_train_steps == 600


def test_ratio_names_and_exif_rotation(tmp_path):
    assert init_wizard.ratio_name(1024, 1024) == "1:1 square"
    assert init_wizard.ratio_name(3000, 4000) == "3:4 portrait"
    assert init_wizard.ratio_name(1920, 1080) == "16:9 landscape"
    assert init_wizard.ratio_name(1000, 3000) == "1:3.00 portrait"
    img = Image.new("RGB", (400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # shot in portrait, stored in landscape
    img.save(tmp_path / "r.jpg", exif=exif)
    assert init_wizard.image_size(tmp_path / "r.jpg") == (300, 400)


def test_every_goal_writes_settings_train_accepts(tmp_path):
    for goal in init_wizard.GOALS:
        answers = {"dir": tmp_path, "model": "a/b", "photos": tmp_path, "photo_lines": [], "trigger": "t",
                   "klass": "c", "prompt": "a photo of t c", "memory_note": "", "bf16": True, "gib": 20.0,
                   "goal": goal}  # fmt: skip
        path = tmp_path / f"{goal}.toml"
        path.write_text(init_wizard.render_toml(init_wizard._sections(answers), "cmd"))
        cfg = _load(path)
        assert cfg.max_train_steps == init_wizard.GOALS[goal].settings["max_train_steps"]
        assert cfg.checkpointing_steps % cfg.validation_steps == 0


def _pane(socket: str, session: str) -> str:
    return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-J", "-S", "-200", "-t", session],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_init_in_a_real_terminal(tiny_model, tmp_path):
    """Typed into a tmux pane: prompts appear one by one, Enter takes the default, and the file is written."""
    photos = tmp_path / "photos"
    write_demo_like_dataset(photos, n=2, size=64)
    socket, session = f"sd3booth-test-{os.getpid()}", "init"
    env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "PATH") if k in os.environ}
    command = (f"env {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.quote(sys.executable)} "
               f"-m sd3booth init {shlex.quote(str(tmp_path))}; echo EXIT=$?; sleep 60")  # fmt: skip
    subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-s", session, "-x", "150", "-y", "50", command],
                   check=True)  # fmt: skip
    try:
        steps = [("Base model", str(tiny_model)), ("Folder of photos", ""), ("Trigger word", "zwx"),
                 ("Class of the subject", "toy"), ("GPU memory to use", ""), ("Goal [2]:", "3")]  # fmt: skip
        for prompt, keys in steps:
            deadline = time.monotonic() + 60
            while prompt not in _pane(socket, session):
                assert time.monotonic() < deadline, f"no prompt {prompt!r}; the screen shows:\n{_pane(socket, session)}"
                time.sleep(0.2)
            if keys:
                subprocess.run(["tmux", "-L", socket, "send-keys", "-t", session, "-l", keys], check=True)
            subprocess.run(["tmux", "-L", socket, "send-keys", "-t", session, "Enter"], check=True)
        deadline = time.monotonic() + 60
        while "EXIT=" not in _pane(socket, session):
            assert time.monotonic() < deadline, _pane(socket, session)
            time.sleep(0.2)
        screen = _pane(socket, session)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    assert "EXIT=0" in screen, screen
    assert f"Folder of photos of the subject [{photos}]: \n" in screen + "\n"  # Enter took the default
    assert "found 2 image(s): sizes 64x64" in screen and "3. best quality" in screen
    cfg = _load(tmp_path / "sd3booth.toml")
    assert (cfg.instance_prompt, cfg.rank, cfg.lr_scheduler) == ("a photo of zwx toy", 32, "cosine")
