"""``sd3booth init [DIR]``: a few questions, then DIR/sd3booth.toml (commented) and the command that trains with it.

Asks for the base model, the photo folder (and says what it found there), the trigger word and class, the GPU
memory (detected, editable) and a goal; ``--yes`` takes every default. Answers are checked as they are given,
so the file it writes is one that ``sd3booth train --config`` accepts.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sd3booth.config import FIELDS
from sd3booth.data import dataset
from sd3booth.errors import UserError

CONFIG_NAME = "sd3booth.toml"
DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


@dataclass(frozen=True)
class Goal:
    label: str
    why: str
    settings: dict[str, Any]


# Starting points, not measured optima: the quick test is the diffusers SD3 README's LoRA recipe (512 px,
# learning rate 4e-4, constant schedule) cut to 200 steps; the others train at SD3's native 1024 px with more
# rank and steps and the learning rate most SD3 LoRA guides use (1e-4).
GOALS = {
    "quick": Goal("quick test", "512 px, rank 4, 200 steps: see that everything works and the subject starts to "
                  "appear", dict(resolution=512, rank=4, learning_rate=4e-4, max_train_steps=200,
                                 validation_steps=50, num_validation_images=2)),
    "balanced": Goal("balanced", "1024 px, rank 16, 600 steps: a usable LoRA of most subjects",
                     dict(resolution=1024, rank=16, learning_rate=1e-4, max_train_steps=600, validation_steps=100,
                          num_validation_images=4)),
    "best": Goal("best quality", "1024 px, rank 32, 1500 steps, cosine schedule: slower; watch the report for "
                 "over-fitting (the subject pasted into every picture)",
                 dict(resolution=1024, rank=32, learning_rate=1e-4, max_train_steps=1500, validation_steps=250,
                      num_validation_images=4, lr_scheduler="cosine", lr_warmup_steps=100)),
}  # fmt: skip
_RATIOS = {"1:1": 1.0, "5:4": 1.25, "4:3": 4 / 3, "3:2": 1.5, "16:9": 16 / 9, "2:1": 2.0}


class Asker:
    """Questions on the terminal (or stdin); with ``assume_yes`` every default is taken without asking."""

    def __init__(self, assume_yes: bool, read: Callable[[str], str] = input, say: Callable[[str], None] = print):
        self.assume_yes, self.read, self.say = assume_yes, read, say
        self.eof = False

    def __call__(self, question: str, default: str, check: Callable[[str], Any]) -> Any:
        """Asks until ``check(answer)`` passes (it raises UserError to refuse); empty answer = default."""
        while True:
            if self.assume_yes or self.eof:
                answer = default
                self.say(f"{question} [{default}]: {default}")
            else:
                try:
                    answer = self.read(f"{question} [{default}]: ").strip() or default
                except EOFError:
                    self.eof = True
                    self.say("(end of input: taking the defaults from here on)")
                    continue
            try:
                return check(answer)
            except UserError as e:
                if self.assume_yes or self.eof:
                    raise
                self.say(f"  {e}")


# ---- the answers, checked ------------------------------------------------------------------------------


def check_model(answer: str) -> str:
    """A local SD3 folder or file (checked now), else a hub id (fetched by the first run)."""
    p = Path(answer).expanduser()
    if p.exists():
        from sd3booth.models.source import resolve_model

        resolve_model(str(p))  # the same check as train's; a UserError says what is wrong
        return str(p.resolve())
    if answer.count("/") != 1 or answer.startswith((".", "/", "~")):
        raise UserError(f"{answer} is neither an existing folder or file nor a hub id like {DEFAULT_MODEL}")
    return answer


def ratio_name(width: int, height: int) -> str:
    """'3:4 portrait', '1:1 square', '16:9 landscape' or the plain ratio when none of the usual ones is near."""
    r = max(width, height) / min(width, height)
    name, near = min(_RATIOS.items(), key=lambda kv: abs(kv[1] - r))
    if abs(near - r) > 0.04 * near:
        name = f"{r:.2f}:1"
    if width == height or name == "1:1":
        return "1:1 square"
    if width > height:
        return f"{name} landscape"
    a, b = name.split(":")
    return f"{b}:{a} portrait"


def image_size(path: Path) -> tuple[int, int]:
    """Width and height as the photo is shown (EXIF rotation applied), without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h


def describe_photos(examples: list[dataset.Example], skipped: list[str], resolution: int = 1024) -> list[str]:
    """What the folder holds: count, sizes, aspect ratios, where captions come from, what to fix."""
    sizes = [image_size(ex.path) for ex in examples]
    small = min(min(s) for s in sizes)
    lines = [f"found {len(examples)} image(s): sizes {_span(sizes)}, smallest side {small} px"]
    ratios = Counter(ratio_name(w, h) for w, h in sizes)
    lines.append("aspect ratios: " + ", ".join(f"{k} x{n}" for k, n in ratios.most_common()))
    sources = Counter(_caption_kind(ex.caption_source) for ex in examples)
    order = [f"from {dataset.METADATA_FILE}", "from .txt files", "use the instance prompt"]
    lines.append("captions: " + ", ".join(f"{sources[k]} {k}" for k in order if sources[k]))
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable file(s): {skipped[0]}{' ...' if len(skipped) > 1 else ''}")
    if len(examples) < 3:
        lines.append("note: 3 to 20 photos of the subject from different angles work best")
    if small < resolution:
        lines.append(f"note: some photos are smaller than {resolution} px; they are upscaled (softer results)")
    return lines


def _span(sizes: list[tuple[int, int]]) -> str:
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"{lo[0]}x{lo[1]}" if lo == hi else f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}"


def _caption_kind(source: str) -> str:
    if source.startswith(dataset.METADATA_FILE):
        return f"from {dataset.METADATA_FILE}"
    if source == "instance_prompt":
        return "use the instance prompt"
    return "from .txt files"


def scan_photos(answer: str) -> tuple[Path, list[dataset.Example], list[str]]:
    root = Path(answer).expanduser().resolve()
    skipped: list[str] = []
    examples = dataset.scan_images(root, instance_prompt="-", warn=skipped.append)
    return root, examples, skipped


def check_word(what: str) -> Callable[[str], str]:
    def check(answer: str) -> str:
        if not answer or any(c in answer for c in '"\\\n'):
            raise UserError(f"the {what} should be a word or two without quotes or backslashes")
        return answer

    return check


def check_gib(answer: str) -> float:
    try:
        gib = float(answer)
    except ValueError:
        raise UserError(f"{answer!r} is not a number of GiB, e.g. 14") from None
    if not 1 <= gib <= 1024:
        raise UserError(f"{gib:g} GiB is outside 1 to 1024")
    return gib


def check_goal(answer: str) -> str:
    keys = list(GOALS)
    picked = keys[int(answer) - 1] if answer.isdigit() and 1 <= int(answer) <= len(keys) else answer.lower()
    if picked not in GOALS:
        raise UserError(f"answer 1, 2 or 3 (or {', '.join(keys)})")
    return picked


def detected_memory() -> tuple[float, str, bool | None]:
    """(suggested --max_vram, what was found, bf16 support or None without a GPU)."""
    from sd3booth.models.placement import detect_device
    from sd3booth.plan.choose import default_budget

    info = detect_device()
    if info.type != "cuda":
        return math.floor(default_budget(None) * 2) / 2, "no GPU found here: planning for a 16 GB card", None
    # the planner's own default (what is free on the card less a margin), rounded down to half a GiB
    suggested = math.floor(default_budget(info.available_gib or info.total_gib) * 2) / 2
    return suggested, f"found {info.name} with {info.total_gib:.1f} GiB", info.bf16


# ---- the file ------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def render_toml(sections: list[tuple[str, list[str], dict[str, Any]]], command: str) -> str:
    """``# ---- title`` blocks of comment lines and ``key = value`` lines; every key must be a setting."""
    out = [
        f"# sd3booth training settings, written by `sd3booth init` on {datetime.now():%Y-%m-%d %H:%M}. Train with:",
        f"#   {command}",
        "# Every key is a flag of `sd3booth train` (`sd3booth train --help` explains them all); a flag given on the",
        "# command line wins over this file.",
    ]
    for title, comments, values in sections:
        out += ["", f"# ---- {title}"] + [f"# {c}" if c else "#" for c in comments]
        for key, value in values.items():
            if key.startswith("# "):
                out.append(f"#{key[1:]} = {toml_value(value)}")
                continue
            if key not in FIELDS:
                raise AssertionError(f"init writes an unknown setting {key}")
            out.append(f"{key} = {toml_value(value)}")
    return "\n".join(out) + "\n"


def _sections(a: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """The file's blocks: (title, comment lines, settings); a key starting with '# ' is written commented out."""
    goal, klass = GOALS[a["goal"]], a["klass"]
    hub = not Path(a["model"]).exists()
    model_notes = ["From the hub: accept its licence on huggingface.co and log in (hf auth login) first."]
    photo_notes = a["photo_lines"] + [
        f"Photos without a caption of their own are captioned '{a['prompt']}'; "
        f"'{a['trigger']}' is the trigger word that will call the subject up."
    ]
    memory: dict[str, Any] = {"max_vram": a["gib"]}
    memory_notes = [a["memory_note"], "The run plans its memory to stay under max_vram GiB and prints the plan "
                    "before any model loads."]  # fmt: skip
    if a["bf16"] is False:
        memory["mixed_precision"] = "fp16"
        memory_notes.append("This GPU has no bf16: fp16 mixed precision.")
    training = {"lr_scheduler": "constant", "lr_warmup_steps": 0, **goal.settings, "train_batch_size": 1, "seed": 0,
                "validation_prompt": f"{a['prompt']} on a beach"}  # fmt: skip
    prior = {"# with_prior_preservation": True, "# class_data_dir": str(a["dir"] / "class_images"),
             "# class_prompt": f"a photo of a {klass}"}  # fmt: skip
    output = {"output_dir": str(a["dir"] / "output"), "checkpointing_steps": 2 * goal.settings["validation_steps"],
              "checkpoints_total_limit": 2}  # fmt: skip
    return [
        ("model", model_notes if hub else [], {"pretrained_model_name_or_path": a["model"]}),
        ("photos", photo_notes, {"instance_data_dir": str(a["photos"]), "instance_prompt": a["prompt"]}),
        ("memory", memory_notes, memory),
        (f"goal: {goal.label}", [goal.why], training),
        ("prior preservation (off)", ["Keeps the class looking like itself; class images are generated first."], prior),
        ("output", ["The LoRA, report.html (open it in a browser), validation images and checkpoints."], output),
    ]


def run_init(directory: Path, assume_yes: bool, read: Callable[[str], str] = input,
             say: Callable[[str], None] = print) -> Path:  # fmt: skip
    """The questions, then DIR/sd3booth.toml; returns its path."""
    ask = Asker(assume_yes, read, say)
    directory = directory.expanduser().resolve()
    target = directory / CONFIG_NAME
    if target.exists() and not ask(f"{target} exists; replace it?", "n", lambda a: a.lower() in ("y", "yes")):
        raise UserError(f"{target} exists; remove it, answer y, or pass another DIR to sd3booth init")
    say("sd3booth init: a few questions (Enter takes the [default]).")
    a: dict[str, Any] = {"dir": directory}
    a["model"] = ask("Base model: hub id, diffusers folder or single .safetensors file", DEFAULT_MODEL, check_model)
    a["photos"], examples, skipped = ask("Folder of photos of the subject", str(directory / "photos"), scan_photos)
    a["photo_lines"] = describe_photos(examples, skipped)
    for line in a["photo_lines"]:
        say(f"  {line}")
    a["trigger"] = ask("Trigger word (a rare word that will mean your subject)", "sks", check_word("trigger word"))
    a["klass"] = ask("Class of the subject (dog, person, backpack, ...)", "dog", check_word("class"))
    a["prompt"] = f"a photo of {a['trigger']} {a['klass']}"
    suggested, a["memory_note"], a["bf16"] = detected_memory()
    say(f"  {a['memory_note']}")
    a["gib"] = ask("GPU memory to use, GiB", f"{suggested:g}", check_gib)
    for i, goal in enumerate(GOALS.values(), 1):
        say(f"  {i}. {goal.label}: {goal.why}")
    a["goal"] = ask("Goal", "2", check_goal)
    command = f"sd3booth train --config {shlex.quote(str(target))}"
    directory.mkdir(parents=True, exist_ok=True)
    target.write_text(render_toml(_sections(a), command), encoding="utf-8")
    say(f"wrote {target}")
    say("train with:")
    say(f"  {command}")
    return target
