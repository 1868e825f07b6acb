"""The ``sd3booth`` command: parses arguments and dispatches; the work lives in the stage modules.

Every failure ends in one line on stderr and an exit code: ``error: ...`` and 2 for anything the user can
cause or meet (bad input, a full or read-only disk, a missing package, no network, out of memory), 130 for
Ctrl-C, 1 with a pointer to ``--debug`` for an unexpected error (a bug). ``--debug`` (anywhere on the
command line, or SD3BOOTH_DEBUG=1) prints the traceback too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from sd3booth import configure_environment
from sd3booth.config import FIELDS, add_train_arguments, build_config, closest
from sd3booth.errors import UserError, explain

DEBUG_FLAG = "--debug"
DEBUG_HELP = "On an error, print the traceback too (also SD3BOOTH_DEBUG=1)."


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one UserError line (exit 2, no usage dump) and never expands an
    abbreviated flag (``--learning_rat`` is an error naming ``--learning_rate``, not a silent match)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    ns, extra = parser.parse_known_args(argv)
    if extra:
        flag = next((e for e in extra if e.startswith("-")), extra[0])
        name = flag.split("=")[0]
        raise UserError(f"{parser.prog}: unknown flag {name}{closest(name, _known_flags(parser))}; see --help")
    return ns


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora", required=True, help="A pytorch_lora_weights.safetensors file, or the output folder of a run."
    )
    p.add_argument("--prompt", required=True, help="What to draw.")
    p.add_argument(
        "--pretrained_model_name_or_path", help="Base model (default: the one in settings.json beside the LoRA)."
    )
    p.add_argument("--num_images", type=int, default=4, help="Images to write. [default: 4]")
    p.add_argument("--seed", type=int, default=0, help="Seed of the first image; image i uses seed + i. [default: 0]")
    p.add_argument("--num_inference_steps", type=int, default=28, help="Sampling steps. [default: 28]")
    p.add_argument("--guidance_scale", type=float, default=7.0, help="Classifier-free guidance. [default: 7.0]")
    p.add_argument(
        "--resolution",
        type=int,
        help="Image size, a multiple of 16 (default: the training resolution, else the model's native size).",
    )
    p.add_argument("--width", type=int, help="Image width, a multiple of 16 (default: --resolution).")
    p.add_argument("--height", type=int, help="Image height, a multiple of 16 (default: --resolution).")
    p.add_argument(
        "--max_sequence_length",
        type=int,
        help="T5 tokens of the prompt (default: the training run's, else 256).",
    )
    p.add_argument(
        "--t5_precision",
        choices=["auto", "bf16", "int8", "nf4", "stream", "cpu", "none"],
        help="How T5 runs while the prompt is encoded (default: the training run's, else auto = the planner's).",
    )
    p.add_argument("--output_dir", default="generated", help="Where the PNGs go. [default: generated]")
    p.add_argument("--cache_dir", help="Text-embedding cache (default: OUTPUT_DIR/cache).")
    p.add_argument(
        "--num_cpu_threads", type=int, help="CPU threads for torch (default on a CPU-only machine: see train --help)."
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    root = _Parser(prog="sd3booth", description="DreamBooth LoRA training for Stable Diffusion 3 / 3.5.")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs: dict[str, argparse.ArgumentParser] = {}
    p = subs["train"] = sub.add_parser(
        "train",
        help="Prepare any missing cache, then train a LoRA.",
        description="Prepare any missing cache (text embeddings, class images, "
        "latents), then train a LoRA. Flags override --config.",
    )
    add_train_arguments(p)
    p = subs["prepare"] = sub.add_parser("prepare", help="Only the caching stages (embeddings, class images, latents).")
    add_train_arguments(p)
    p = subs["generate"] = sub.add_parser("generate", help="PNGs from the base model plus one LoRA.")
    _add_generate_arguments(p)
    p = subs["random-model"] = sub.add_parser(
        "random-model", help="Write a random-weight SD3 pipeline (tests, benchmarks)."
    )
    p.add_argument("dir", help="Folder to write (replaced if it exists).")
    p.add_argument(
        "--arch",
        default="tiny",
        choices=["tiny", "sd3-medium", "sd3.5-medium", "sd3.5-large"],
        help="tiny for tests and the demo; the others at true size. [default: tiny]",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights. [default: 0]")
    p = subs["bench"] = sub.add_parser("bench", help="GPU memory and speed of every stage, beside the stock stack.")
    p.add_argument(
        "--arch",
        default="sd3-medium",
        choices=["sd3-medium", "sd3.5-medium", "sd3.5-large"],
        help="Random true-size model to measure. [default: sd3-medium]",
    )
    p.add_argument("--model_dir", help="Use this model folder instead of writing a random one.")
    p.add_argument("--output_dir", default="bench-out", help="Where results go. [default: bench-out]")
    p.add_argument(
        "--parts", default="stock,calibrate,budgets", help="Comma list of stock, calibrate, budgets, speed, long."
    )
    p.add_argument("--resolutions", default="1024,512", help="Training resolutions; budgets use the first.")
    p.add_argument("--budgets", default="3,4,6,8,12,16,default", help="--max_vram values ('default': none).")
    p.add_argument("--steps", type=int, default=10, help="Timed steps per measurement. [default: 10]")
    p.add_argument(
        "--long_steps",
        type=int,
        default=0,
        help="long: steps of the whole timed run of each stack, compilation included. [default: 500]",
    )
    p.add_argument(
        "--optimizer",
        default="adamw8bit",
        choices=["adamw", "adamw8bit", "prodigy"],
        help="budgets: the optimizer of the train runs (the stock recipe's, unless told). [default: adamw8bit]",
    )
    p.add_argument(
        "--refit",
        metavar="RESULTS",
        help="Measure nothing (no GPU): fit calibration.json from the stored results in RESULTS (e.g. bench/results,"
        " runs named in its calibration-sources.json) and write it over the packaged one (docs/calibration.md).",
    )
    p.add_argument("--calibration_out", help="--refit: write here instead of the packaged calibration.json.")
    p = subs["demo"] = sub.add_parser("demo", help="A whole run on a tiny random model and a bundled dataset, on CPU.")
    p.add_argument("--output_dir", default="sd3booth-demo", help="Where the demo run goes. [default: sd3booth-demo]")
    _add_first_hour_commands(sub, subs)
    for p in (root, *subs.values()):
        p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return root, subs


def _add_first_hour_commands(sub: Any, subs: dict[str, argparse.ArgumentParser]) -> None:
    p = subs["init"] = sub.add_parser("init", help="A few questions, then a commented config file for train.")
    p.add_argument("dir", nargs="?", default=".", help="Where sd3booth.toml (and the run's output) go. [default: .]")
    p.add_argument("--yes", action="store_true", help="Take every default without asking.")
    p = subs["report"] = sub.add_parser("report", help="Rebuild OUTPUT_DIR/report.html of a run folder.")
    p.add_argument("output_dir", help="The --output_dir of a training run.")


def _cpu_run() -> bool:
    import torch

    return not torch.cuda.is_available()


def _cmd_train(ns: argparse.Namespace, prepare_only: bool) -> int:
    cfg = build_config(vars(ns))
    from sd3booth.models.threads import configure_threads

    configure_threads(cfg.num_cpu_threads, _cpu_run())
    if prepare_only:
        from sd3booth.prepare import prepare_command

        prepare_command(cfg)
        return 0
    from sd3booth.train import loop

    result = loop.train(cfg)
    if result.lora_path is not None:  # None on the non-main processes of a multi-GPU run
        from sd3booth.report import REPORT_FILE, generate_command

        print(f"LoRA:   {result.lora_path}")
        print(f"report: {result.output_dir / REPORT_FILE}")
        print(f"draw:   {generate_command(result.output_dir, cfg.to_dict())}")
    return 0


LORA_FILE = "pytorch_lora_weights.safetensors"


def _lora_file(given: str) -> Path:
    """The LoRA file ``--lora`` names: a file, or a run's output folder holding one; UserError otherwise."""
    p = Path(given).expanduser()
    if p.is_dir():
        if (p / LORA_FILE).is_file():
            return p / LORA_FILE
        raise UserError(
            f"--lora {given} is a folder without {LORA_FILE}; pass the LoRA file, or the output folder of a "
            "finished run"
        )
    if not p.exists():
        raise UserError(f"--lora {given} does not exist; pass the {LORA_FILE} a training run wrote")
    from sd3booth.models.files import damage

    reason = damage(p)
    if reason:
        raise UserError(f"--lora {p} is damaged or not a safetensors file ({reason}); pass a whole {LORA_FILE}")
    return p


def _check_generate_flags(ns: argparse.Namespace) -> None:
    for name in ("num_images", "num_inference_steps", "max_sequence_length", "num_cpu_threads"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if ns.resolution is not None and (ns.resolution < 16 or ns.resolution % 16):
        raise UserError(f"--resolution {ns.resolution} must be a positive multiple of 16 (VAE factor 8 x patch size 2)")


def _lora_settings(lora_path: Path) -> dict[str, Any]:
    """The settings of the run that wrote the LoRA (settings.json beside it), {} if there is none."""
    settings_file = lora_path.parent / "settings.json"
    if not settings_file.is_file():
        return {}
    try:
        record = json.loads(settings_file.read_text(encoding="utf-8"))
        settings = record.get("settings", {}) if isinstance(record, dict) else {}
        return settings if isinstance(settings, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"warning: {settings_file} cannot be read ({type(e).__name__}); its settings are not used",
              file=sys.stderr)  # fmt: skip
        return {}


def _cmd_generate(ns: argparse.Namespace) -> int:
    from sd3booth.config import TrainConfig
    from sd3booth.models import placement, source
    from sd3booth.models.threads import configure_threads
    from sd3booth.sample import generate_with_lora

    _check_generate_flags(ns)
    lora_path = _lora_file(ns.lora)
    settings = _lora_settings(lora_path)
    model = ns.pretrained_model_name_or_path or settings.get("pretrained_model_name_or_path")
    if not model:
        raise UserError(
            f"generate: no base model: no settings.json beside {lora_path} names one; pass "
            "--pretrained_model_name_or_path"
        )
    configure_threads(ns.num_cpu_threads, _cpu_run())
    out = Path(ns.output_dir)
    src = source.resolve_model(model)
    largest, native = source.resolution_limits(src)  # the default fits the model's position embedding
    resolution = ns.resolution or settings.get("resolution") or min(x for x in (native or 1024, largest) if x)
    source.check_resolution(src, resolution)
    for flag, value in (("--width", ns.width), ("--height", ns.height)):
        if value is not None:
            source.check_resolution(src, value, flag)
    size = (ns.width or resolution, ns.height or resolution)
    # the placement the training run got (its settings, else a default run's), so both share text-cache entries
    run = TrainConfig(
        pretrained_model_name_or_path=model,
        resolution=resolution,
        t5_precision=ns.t5_precision or settings.get("t5_precision") or "auto",
        max_sequence_length=ns.max_sequence_length or settings.get("max_sequence_length") or 256,
        mixed_precision=settings.get("mixed_precision"),
    )
    place = placement.place_run(run, src.root, placement.detect_device())
    paths = generate_with_lora(
        model,
        lora_path,
        ns.prompt,
        out,
        ns.num_images,
        ns.seed,
        ns.num_inference_steps,
        ns.guidance_scale,
        size,
        run.max_sequence_length,
        place,
        Path(ns.cache_dir) if ns.cache_dir else out / "cache",
    )
    for p in paths:
        print(p)
    return 0


def _cmd_random_model(ns: argparse.Namespace) -> int:
    from sd3booth.models.source import quiet_libraries
    from sd3booth.random_model import write_random_model

    quiet_libraries()
    print(write_random_model(ns.dir, ns.arch, ns.seed))
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    if ns.refit:
        from sd3booth.bench.fit import refit_command

        return refit_command(Path(ns.refit), Path(ns.calibration_out) if ns.calibration_out else None)
    from sd3booth.bench.run import run_bench

    budgets = [None if b == "default" else float(b) for b in ns.budgets.split(",") if b]
    run_bench(
        ns.arch,
        Path(ns.model_dir) if ns.model_dir else None,
        Path(ns.output_dir),
        ns.parts.split(","),
        [int(r) for r in ns.resolutions.split(",")],
        budgets,
        ns.steps,
        "sd3booth bench " + " ".join(sys.argv[2:]),
        long_steps=ns.long_steps,
        optimizer=ns.optimizer,
    )
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from sd3booth.demo import run_demo
    from sd3booth.models.threads import configure_threads

    configure_threads(None, _cpu_run())
    run_demo(Path(ns.output_dir))
    return 0


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        with contextlib.suppress(Exception):
            bar.close()


def _dispatch(argv: list[str], root: argparse.ArgumentParser, subs: dict[str, argparse.ArgumentParser]) -> int:
    if not argv or argv[0] not in subs:
        if argv and argv[0] in ("-h", "--help"):
            root.print_help()
            return 0
        if argv:
            known = list(subs)
            raise UserError(f"unknown command {argv[0]!r}{closest(argv[0], known)}; commands: {', '.join(known)}")
        root.print_help()
        return 2
    ns = _parse(subs[argv[0]], argv[1:])
    command = argv[0]
    if command in ("train", "prepare"):
        return _cmd_train(ns, prepare_only=command == "prepare")
    if command == "generate":
        return _cmd_generate(ns)
    if command == "random-model":
        return _cmd_random_model(ns)
    if command == "bench":
        return _cmd_bench(ns)
    if command == "init":
        from sd3booth.init_wizard import run_init

        run_init(Path(ns.dir), ns.yes)
        return 0
    if command == "report":
        from sd3booth.report import report_command

        print(report_command(Path(ns.output_dir)))
        return 0
    return _cmd_demo(ns)


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("SD3BOOTH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    root, subs = build_parser()
    try:
        return _dispatch(argv, root, subs)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure ends in one line
        code, line = explain(e)
        _close_progress_bars()  # so the line starts on a line of its own
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        print(line if code == 130 else f"error: {line}", file=sys.stderr)
        return code


__all__ = ["main", "explain", "FIELDS"]
