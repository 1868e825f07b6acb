"""``sd3booth lora info|convert|merge|resize|extract``: the LoRA tools' command line (maths in adapters.tools,
file layouts in adapters.layouts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from sd3booth import __version__
from sd3booth.errors import UserError

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("diffusers", "kohya", "comfyui")


def parse_weighted(spec: str, flag: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]``; a colon whose tail is no number belongs to the path (``C:\\x``, ``a:b.safetensors``)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head).expanduser(), float(tail)
        except ValueError:
            pass
    if not spec:
        raise UserError(f"{flag} needs a file, optionally with :WEIGHT (e.g. style.safetensors:0.7)")
    return Path(spec).expanduser(), 1.0


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fraction(value: str) -> float:
    x = float(value)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {x}")
    return x


def _output_args(p: argparse.ArgumentParser, default_to: str | None = "diffusers") -> None:
    p.add_argument("-o", "--output", required=True, help="The LoRA file to write.")
    p.add_argument(
        "--to", choices=FORMATS, default=default_to, help=f"Layout of the written file. [default: {default_to}]"
    )
    p.add_argument(
        "--save_precision", choices=list(PRECISIONS), help="Tensor type of the written file (default: the input's)."
    )


def _rank_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rank", type=_positive_int, help="Rank of every layer of the result.")
    g.add_argument(
        "--energy", type=_fraction, help="Per layer, the smallest rank keeping this share of the change (e.g. 0.95)."
    )


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Registers ``lora`` and its sub-commands under the root parser's subparsers."""
    p = sub.add_parser("lora", help="LoRA tools: info, convert, merge, resize, extract.")
    tools = p.add_subparsers(dest="lora_command", metavar="TOOL", parser_class=type(p))
    t = tools.add_parser("info", help="Format, rank, alpha, targets, base model and training settings of a LoRA.")
    t.add_argument("file", help="A LoRA .safetensors (diffusers, kohya or ComfyUI).")
    t = tools.add_parser("convert", help="Rewrite a LoRA in another layout (same merged weights).")
    t.add_argument("input", help="A LoRA .safetensors (any of the three layouts, detected).")
    t.add_argument("output", help="The file to write.")
    t.add_argument("--to", required=True, choices=FORMATS, help="diffusers, kohya or comfyui.")
    t.add_argument("--save_precision", choices=list(PRECISIONS), help="Tensor type (default: the input's).")
    t = tools.add_parser("merge", help="Exact weighted sum of LoRAs, re-factorised by SVD.")
    t.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRAs and their weights (default 1.0).")
    _rank_args(t, required=False)
    _output_args(t)
    t = tools.add_parser("resize", help="Change a LoRA's rank by SVD (--rank N or --energy 0.95).")
    t.add_argument("input", help="A LoRA .safetensors.")
    _rank_args(t, required=True)
    _output_args(t)
    t = tools.add_parser("extract", help="A LoRA of the difference between a fine-tuned model and its base, by SVD.")
    t.add_argument("--base", required=True, help="The base model: diffusers folder, hub id or single file.")
    t.add_argument("--tuned", required=True, help="The fine-tuned model, same architecture.")
    _rank_args(t, required=True)
    t.add_argument(
        "--lora_layers",
        help="Comma-separated layer names as in training (e.g. attn.to_q,attn.to_k), or 'all' for every Linear "
        "(default: the training default, the attention projections).",
    )
    t.add_argument("--device", default="auto", help="Where the SVDs run: auto (the GPU if any), cpu, cuda[:N].")
    _output_args(t)
    return p


def _dtype(ns: argparse.Namespace, default: torch.dtype) -> torch.dtype:
    return PRECISIONS[ns.save_precision] if ns.save_precision else default


def _meta(extra: dict[str, Any]) -> dict[str, str]:
    return {
        "sd3booth.version": __version__,
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()},
    }


def _info(ns: argparse.Namespace) -> None:
    from sd3booth.adapters import layouts, tools

    for line in tools.describe(layouts.read_lora(ns.file)):
        print(line)


def _convert(ns: argparse.Namespace) -> None:
    from sd3booth.adapters import layouts

    lf = layouts.read_lora(ns.input)
    meta = {**lf.metadata, **_meta({"sd3booth.converted_from": f"{lf.path.name} ({lf.format})"})}
    meta.pop("lora_adapter_metadata", None)  # the scale is folded in now
    out = layouts.write_lora(lf.modules, Path(ns.output), ns.to, _dtype(ns, lf.dtype), meta)
    print(f"{lf.format} -> {ns.to}: {len(lf.modules)} layers written to {out}")


def _merge(ns: argparse.Namespace) -> None:
    from sd3booth.adapters import layouts, tools

    inputs = [parse_weighted(s, "merge") for s in ns.inputs]
    files = [(layouts.read_lora(p), w) for p, w in inputs]
    modules, report = tools.merge([(lf.modules, w) for lf, w in files], ns.rank, ns.energy)
    merged_from = [{"file": lf.path.name, "format": lf.format, "weight": w} for lf, w in files]
    meta = _meta({"sd3booth.merged_from": merged_from, "sd3booth.type": "lora"})
    out = layouts.write_lora(modules, Path(ns.output), ns.to, _dtype(ns, files[0][0].dtype), meta)
    print(f"merged {len(files)} LoRA(s): {report.describe()}")
    print(f"written to {out}")


def _resize(ns: argparse.Namespace) -> None:
    from sd3booth.adapters import layouts, tools

    lf = layouts.read_lora(ns.input)
    modules, report = tools.resize(lf.modules, ns.rank, ns.energy)
    meta = {**lf.metadata, **_meta({"sd3booth.resized_from": f"{lf.path.name} (rank {lf.ranks})"})}
    meta.pop("lora_adapter_metadata", None)
    out = layouts.write_lora(modules, Path(ns.output), ns.to, _dtype(ns, lf.dtype), meta)
    print(f"resized: {report.describe()}")
    print(f"written to {out}")


def _extract(ns: argparse.Namespace) -> None:
    from sd3booth.adapters import layouts, tools
    from sd3booth.models.weights import TransformerWeights, matching

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if ns.device == "auto" else None
    try:
        device = device or torch.device(ns.device)
    except RuntimeError:
        raise UserError(f"--device {ns.device} is not a device; use auto, cpu or cuda[:N]") from None
    base, tuned = TransformerWeights(ns.base, "--base"), TransformerWeights(ns.tuned, "--tuned")
    layers = None if ns.lora_layers == "all" else _layers(ns.lora_layers)
    names = matching(base.names(), layers)
    modules, report, unchanged = tools.extract(base, tuned, names, ns.rank, ns.energy, device)
    if not modules:
        raise UserError(f"--tuned {ns.tuned} equals --base in all {len(names)} chosen layers; nothing to extract")
    meta = _meta({"sd3booth.extracted_from": {"base": ns.base, "tuned": ns.tuned}, "sd3booth.type": "lora"})
    out = layouts.write_lora(modules, Path(ns.output), ns.to, _dtype(ns, torch.bfloat16), meta)
    print(f"extracted on {device}: {report.describe()}; {len(unchanged)} layer(s) unchanged")
    print(f"written to {out}")


def _layers(spec: str | None) -> list[str]:
    from sd3booth.config import DEFAULT_LORA_LAYERS

    return [s.strip() for s in spec.split(",") if s.strip()] if spec else list(DEFAULT_LORA_LAYERS)


def run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the chosen tool; 2 with the usage when none is chosen."""
    from sd3booth.models.source import quiet_libraries

    commands = {"info": _info, "convert": _convert, "merge": _merge, "resize": _resize, "extract": _extract}
    if not getattr(ns, "lora_command", None):
        parser.print_help()
        return 2
    quiet_libraries()
    commands[ns.lora_command](ns)
    return 0
