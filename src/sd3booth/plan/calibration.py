"""The measured coefficients the planner predicts with: ``calibration.json``.

Every key, its unit and the ``sd3booth bench`` part that fits it are listed once, in :data:`SCHEMA` (in the
order the file is written); ``docs/calibration.md`` shows the same table (:func:`schema_table`) with the
formulas they enter. Sizes are in GiB (2**30 bytes). Activation terms are in bytes per *unit*, one unit being
one token x one hidden channel (``tokens * hidden / 2**30`` GiB per byte/unit), so that one coefficient
serves every model and resolution.

The packaged file is fitted from the raw results stored under ``bench/results/`` and nothing else
(``sd3booth bench --refit bench/results``; the runs used are named in ``bench/results/calibration-sources.json``),
and a test refits it byte for byte. Pure Python: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# the bench part that fits a key; "constant" keys are set here, not measured
PARTS = ("calibrate", "budgets", "speed", "process", "constant")


@dataclass(frozen=True)
class Key:
    """One entry of calibration.json."""

    path: str  # dotted path in the file, e.g. "coefficients.act_full"
    unit: str
    part: str  # one of PARTS
    doc: str
    value: Any = None  # constants only


DOC = (
    "Coefficients of sd3booth's memory and speed planner. Each key's unit and the bench part that fits it: "
    "docs/calibration.md (sd3booth.plan.calibration.SCHEMA). Refit from the stored raw results with "
    "`sd3booth bench --refit bench/results`."
)
_U = "bytes/unit"  # unit = one token x one hidden channel
SCHEMA: tuple[Key, ...] = (
    Key("_doc", "text", "constant", "what this file is and where it is documented", DOC),
    Key("source", "text", "calibrate", "the calibrate run the calibrate keys come from (device, date)"),
    Key("safety", "fraction", "constant", "a plan must fit budget x safety", 0.95),
    Key("bytes_per_param.bf16", "bytes/param", "constant", "bf16 weights", 2.0),
    Key("bytes_per_param.fp8", "bytes/param", "calibrate", "fp8-stored block weights, scales included"),
    Key("bytes_per_param.nf4", "bytes/param", "calibrate", "NF4 block weights, quantisation state included"),
    Key("bytes_per_param.t5_bf16", "bytes/param", "constant", "T5 in bf16", 2.0),
    Key("bytes_per_param.t5_int8", "bytes/param", "calibrate", "T5 in LLM.int8 (T5 stage peak less activations)"),
    Key("bytes_per_param.t5_nf4", "bytes/param", "calibrate", "T5 in NF4 (T5 stage peak less activations)"),
    Key("coefficients.fixed", "GiB", "calibrate", "overhead of every stage (floor 0.05)"),
    Key("coefficients.act_full", _U, "calibrate", "activations kept by one uncheckpointed block"),
    Key("coefficients.act_checkpointed", _U, "calibrate", "what one checkpointed block keeps (its inputs)"),
    Key("coefficients.act_inference", _U, "calibrate", "no-grad forward of the whole model, per guidance image"),
    Key("coefficients.clip_l_act_per8", "GiB", "calibrate", "CLIP-L activations for 8 prompts"),
    Key("coefficients.clip_g_act_per8", "GiB", "calibrate", "CLIP-G activations for 8 prompts"),
    Key("coefficients.t5_act_per8x256", "GiB", "calibrate", "T5 activations for 8 prompts x 256 tokens"),
    Key("coefficients.vae_encode_per_mpx", "GiB/Mpx", "calibrate", "VAE encode activations per 1024x1024 px"),
    Key("coefficients.vae_decode_per_mpx", "GiB/Mpx", "calibrate", "bare vae.decode activations per 1024x1024 px"),
    Key("coefficients.base_extra.nf4", "GiB", "calibrate", "NF4 dequantisation buffers at base_extra_units"),
    Key("coefficients.base_extra.fp8", "GiB", "calibrate", "fp8 upcast buffers at base_extra_units"),
    Key("coefficients.base_extra_units", "GiB/(byte/unit)", "calibrate", "units of the step base_extra was seen at"),
    Key("coefficients.t5_stream_base", "GiB", "calibrate", "streamed T5 (layer by layer) less its activations"),
    Key("coefficients.pipeline_decode_extra_per_mpx", "GiB/Mpx", "budgets",
        "decoding inside the pipeline beyond a bare vae.decode: largest excess of a whole run's validation peak"),
    Key("coefficients.act_full_compiled", _U, "speed", "act_full with the block compiled"),
    Key("coefficients.act_checkpointed_compiled", _U, "speed", "act_checkpointed with the blocks compiled"),
    Key("time.s_per_step_1024_bf16_full_ckpt", "s", "calibrate", "reference step: 1024 px, batch 1, bf16, all ckpt"),
    Key("time.calibration_blocks", "blocks", "calibrate", "blocks of the model the reference step was timed on"),
    Key("time.launch_bound_fraction", "ratio", "speed", "s/step(batch 4) / s/step(batch 1) / 4, eager"),
    Key("time.checkpoint_overhead", "ratio", "calibrate", "s/step all checkpointed / none checkpointed - 1"),
    Key("time.base_factor.bf16", "ratio", "constant", "step time of a bf16 base against bf16", 1.0),
    Key("time.base_factor.fp8", "ratio", "calibrate", "step time of an fp8 base against bf16 (all ckpt)"),
    Key("time.base_factor.nf4", "ratio", "calibrate", "step time of an NF4 base against bf16 (all ckpt)"),
    Key("time.h2d_gbps", "GB/s", "calibrate", "pinned host-to-device copy (block swap)"),
    Key("time.swap_overhead_per_block", "s/block", "calibrate", "all-swapped step beyond max(compute, copy)"),
    Key("time.activation_offload_factor", "ratio", "calibrate", "s/step with activation offload / without"),
    Key("time.compiled_factor_none", "ratio", "speed", "compiled / eager s/step, no checkpointing"),
    Key("time.compiled_factor_all", "ratio", "speed", "compiled / eager s/step, all checkpointed"),
    Key("time.launch_bound_fraction_compiled", "ratio", "speed", "launch_bound_fraction, compiled"),
    Key("process.runtime_overhead_gib", "GiB", "process",
        "whole-process GPU memory outside the allocator (context, cuBLAS/cuDNN workspaces), when not measured: "
        "median NVML peak less reserved peak of the eager runs (else the least of the compiled ones)"),
    Key("process.compiled_extra_gib", "GiB", "process",
        "more outside the allocator when blocks are compiled: median of the compiled runs less runtime_overhead_gib"),
    Key("process.source", "text", "process", "the whole runs the process keys come from"),
    Key("host.process_gib", "GiB", "process",
        "host RSS of the process itself (Python, torch, tokenizers); stated: a GPU run cannot tell it from the next"),
    Key("host.cuda_libs_gib", "GiB", "process",
        "host RSS the CUDA libraries add once a GPU is used: the runs' CLIP-G stage less process_gib and staging"),
    Key("host.pinned_overhead_per_gib", "GiB/GiB", "process",
        "RSS per GiB of swapped blocks' pinned packs beyond their bytes (least squares over the training stages)"),
    Key("host.compile_worker_gib", "GiB", "process",
        "host RSS of one inductor compile worker while the first step compiles (least squares: compiling runs "
        "against ones that loaded their blocks from the compile cache)"),
    Key("host.compile_workers", "processes", "process", "inductor compile workers (models.speed.COMPILE_WORKERS)"),
    Key("host.t5_act_per_token_gib", "GiB/token", "process", "host activations of a CPU/streamed T5 per token"),
    Key("host.training_extra_gib", "GiB", "process",
        "host RSS the training stage adds (compiled code, autograd, optimizer, hooks): least squares intercept"),
    Key("host.source", "text", "process", "the whole runs the host keys come from"),
    Key("compiled_source", "text", "speed", "the speed run the speed keys come from (device, date)"),
    Key("decode_source", "text", "budgets", "the budget run(s) pipeline_decode_extra_per_mpx comes from"),
)  # fmt: skip


def load_calibration(path: Path | None = None) -> dict[str, Any]:
    if path is None:
        text = (resources.files("sd3booth.plan") / "calibration.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return json.loads(text)


def packaged_calibration_path() -> Path:
    """The packaged calibration.json on disk (in the source tree for an editable install)."""
    return Path(__file__).with_name("calibration.json")


def _get(cal: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(cal, dict) or part not in cal:
            raise KeyError(path)
        cal = cal[part]
    return cal


def _put(cal: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        cal = cal.setdefault(part, {})
    cal[last] = value


def template() -> dict[str, Any]:
    """The constants only, in file order: what a fit starts from."""
    cal: dict[str, Any] = {}
    for key in SCHEMA:
        if key.part == "constant":
            _put(cal, key.path, key.value)
    return cal


def arrange(cal: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """``cal`` with its keys in SCHEMA order and the constants set. Strict: every key must be present (a
    missing one raises KeyError naming them all) and no key outside SCHEMA may be; else both are tolerated
    (missing ones left out, unknown ones appended)."""
    out: dict[str, Any] = {}
    missing = []
    for key in SCHEMA:
        try:
            _put(out, key.path, key.value if key.part == "constant" else _get(cal, key.path))
        except KeyError:
            missing.append(key.path)
    extra = sorted(set(flat_keys(cal)) - {k.path for k in SCHEMA})
    if strict and (missing or extra):
        raise KeyError(f"calibration keys missing: {missing}; unknown: {extra}")
    for path in extra:
        _put(out, path, _get(cal, path))
    return out


def flat_keys(cal: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a calibration dict."""
    out = []
    for k, v in cal.items():
        out += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def schema_table() -> str:
    """SCHEMA as a markdown table (docs/calibration.md holds it; a test keeps the two equal)."""
    lines = ["| key | unit | fitted by | meaning |", "|---|---|---|---|"]
    for k in SCHEMA:
        if k.part != "constant":
            part = f"`bench --parts {k.part}`"
        else:
            part = "constant" if isinstance(k.value, str) else f"constant ({k.value})"
        lines.append(f"| `{k.path}` | {k.unit} | {part} | {k.doc} |")
    return "\n".join(lines) + "\n"


def dumps(cal: dict[str, Any]) -> str:
    """The text of a calibration file (as packaged: 2-space indent, newline at the end)."""
    return json.dumps(cal, indent=2) + "\n"
