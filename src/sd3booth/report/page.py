"""report.html: one self-contained page (inline CSS and SVG, images as data URIs, no script, no network)."""

from __future__ import annotations

import base64
import html
import io
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from sd3booth.report import charts
from sd3booth.report.read import RunFolder, changed_settings

REPORT_FILE = "report.html"
THUMB_PX = 256  # longest side of an embedded image: a 40-validation grid stays a few MB
MAX_COLUMNS = 12  # validation steps shown in the grid (evenly spread, first and last always)
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6475} code{background:#eceff3;padding:1px 5px;border-radius:4px;font-size:13px}
pre{background:#1d2330;color:#e8ebf0;padding:10px 12px;border-radius:6px;overflow-x:auto;white-space:pre-wrap}
table{border-collapse:collapse;background:#fff;font-size:13px} td,th{border:1px solid #dde1e7;padding:3px 8px}
th{background:#eef1f5;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:8px;overflow-x:auto}
.card svg{max-width:100%;height:auto}
table.grid td{vertical-align:top;text-align:center;background:#fff}
table.grid img{width:160px;height:auto;display:block}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.done{background:#2f9e44} .running{background:#e8590c}
"""


def generate_command(out: Path, settings: dict[str, Any]) -> str:
    """The ``sd3booth generate`` line for this run's LoRA, with its validation (else instance) prompt."""
    prompt = _first(settings.get("validation_prompt")) or settings.get("instance_prompt") or "a photo of sks dog"
    lora = Path(out) / "pytorch_lora_weights.safetensors"
    return f"sd3booth generate --lora {shlex.quote(str(lora))} --prompt {shlex.quote(prompt)}"


def _first(value: Any) -> str | None:
    """The first validation prompt (a list since --validation_prompt is repeatable; one string in older runs)."""
    return (value[0] if value else None) if isinstance(value, list) else value


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{_e(_fmt(v))}</td>' if _number(v) else f"<td>{_e(_fmt(v))}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def json_table(data: Any) -> str:
    """Any small JSON as a table: a list of objects (columns = their keys), an object of objects, or values."""
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = [{"": k, **v} for k, v in data.items()]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        cols = list(dict.fromkeys(k for r in data for k in r))
        return _table(cols, [[r.get(c) for c in cols] for r in data])
    if isinstance(data, dict):
        return _table(["", "value"], [[k, v] for k, v in data.items()])
    return f"<pre>{_e(data)}</pre>"


def thumbnail_uri(path: Path, size: int = THUMB_PX) -> str:
    """A JPEG data URI of the image, its longest side at most ``size`` pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def spread(items: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` items, evenly spaced, always the first and the last."""
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def grid_html(run: RunFolder) -> str:
    """Validation images: one row per image (its seed), one column per validation step."""
    if not run.validation:
        return '<p class="sub">No validation images yet (set --validation_prompt).</p>'
    steps = spread(list(run.validation), MAX_COLUMNS)
    names = sorted({p.name for s in steps for p in run.validation[s]})
    head = "<tr><th></th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>"
    rows = []
    seed = run.settings.get("seed") or 0
    for i, name in enumerate(names):
        cells = []
        for s in steps:
            p = next((q for q in run.validation[s] if q.name == name), None)
            rel = os.path.relpath(p, run.out) if p else ""
            cells.append(f'<td><a href="{_e(rel)}"><img alt="step {s} {_e(name)}" src="{thumbnail_uri(p)}"></a></td>'
                         if p else "<td></td>")  # fmt: skip
        rows.append(f"<tr><th>image {i + 1}<br><span class='sub'>seed {seed + i}</span></th>{''.join(cells)}</tr>")
    given = run.settings.get("validation_prompt") or ""
    prompt = " | ".join(given) if isinstance(given, list) else given  # several prompts: p0-, p1-... images
    note = f" ({len(run.validation)} validations, {len(steps)} shown)" if len(steps) < len(run.validation) else ""
    return (f'<p>Prompt: <code>{_e(prompt)}</code>{note}</p><div class="card"><table class="grid" id="grid">'
            f"{head}{''.join(rows)}</table></div>")  # fmt: skip


_STAGE_COLUMNS = {
    "seconds": "seconds",
    "peak_allocated_gib": "GPU peak allocated GiB",
    "peak_reserved_gib": "GPU peak reserved GiB",
    "peak_process_gpu_gib": "GPU whole process GiB",
    "allocated_after_gib": "GPU allocated after GiB",
    "peak_host_rss_gib": "host RSS peak GiB",
    "peak_host_rss_parts_gib": "host RSS at its peak: anon / file / shmem GiB",
}
_PREDICTED = {"predicted": ("peak_allocated_gib", "plan: GPU GiB"), "predicted_host": ("peak_host_rss_gib",
              "plan: host GiB")}  # fmt: skip


def _predicted_for(stage: str, predictions: dict[str, float]) -> float | None:
    """The plan's prediction for a stage: its names are short forms of the stage names ('T5' in 'text encoder
    T5 (bf16)', 'validation' in 'validation step 20')."""
    return next((v for k, v in predictions.items() if k.lower() in stage.lower()), None)


def _parts(v: Any) -> Any:
    """A value of stages.json as a cell: the host RSS parts ({anon, file, shmem}) as one "a / f / s" text."""
    return " / ".join(f"{x:.2f}" for x in v.values()) if isinstance(v, dict) else v


def stages_html(run: RunFolder) -> str:
    """Time and peak memory of every stage, beside what the memory plan predicted where it measured the same."""
    if not run.stages:
        return '<p class="sub">stages.json is written at the end of the run.</p>'
    keys = [k for k in _STAGE_COLUMNS if any(k in s for s in run.stages)]
    keys += [k for k in dict.fromkeys(k for s in run.stages for k in s) if k.endswith("_gib") and k not in keys]
    on_gpu = bool(run.plan.get("budget_gib"))  # the plan's predictions are for a GPU run (budget 0: the CPU)
    plans = [(run.plan[name], label) for name, (measured, label) in _PREDICTED.items()
             if on_gpu and isinstance(run.plan.get(name), dict) and run.plan[name] and measured in keys]  # fmt: skip
    header = ["stage"] + [_STAGE_COLUMNS.get(k, k) for k in keys] + [label for _, label in plans]
    rows = [[s["stage"]] + [_parts(s.get(k)) for k in keys] + [_predicted_for(s["stage"], p) for p, _ in plans]
            for s in run.stages]  # fmt: skip
    svg = charts.memory_svg(run.stages)
    return _table(header, rows) + (f'<div class="card" id="memory-chart">{svg}</div>' if svg else "")


def plan_html(run: RunFolder) -> str:
    if not run.plan:
        return '<p class="sub">No plan.json.</p>'
    scalars = [[k, v] for k, v in run.plan.items() if not isinstance(v, dict)]
    steps = sorted(m["s_per_step"] for m in run.metrics if m.get("s_per_step"))
    if steps:
        scalars.append(["measured s/step (median of logs)", steps[len(steps) // 2]])
    parts = [_table(["choice", "value"], scalars)]
    if run.plan.get("budget_gib", 0) == 0:
        parts.append('<p class="sub">No GPU: the budget and predictions do not apply to this run.</p>')
    return "".join(parts)


def header_html(run: RunFolder) -> str:
    done = run.lora is not None and (run.max_steps is None or run.last_step >= run.max_steps)
    total = f" of {run.max_steps}" if run.max_steps else ""
    state = ('<span class="pill done">finished</span>' if done else
             '<span class="pill running">in progress</span>')  # fmt: skip
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    loss = f", last loss {losses[-1]:.4f}" if losses else ""
    model = run.settings.get("pretrained_model_name_or_path", "?")
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"<h1>sd3booth run: {_e(run.out.resolve().name)}</h1>",
        f'<p class="sub">{state} step {run.last_step}{total}{loss} · base model <code>{_e(model)}</code> · '
        f"written {when}</p>",
    ]
    if run.lora is not None:
        lines.append(f"<p>LoRA: <code>{_e(run.lora)}</code>. Draw with it:</p>")
        lines.append(f"<pre>{_e(generate_command(run.out, run.settings))}</pre>")
    return "".join(lines)


def render(run: RunFolder) -> str:
    """The whole page."""
    svg = charts.training_svg(run.metrics)
    changed = changed_settings(run.settings)
    sections = [
        header_html(run),
        "<h2>Validation images</h2>",
        grid_html(run),
        "<h2>Training</h2>",
        f'<div class="card" id="training-chart">{svg}</div>' if svg else '<p class="sub">No logged steps yet.</p>',
        "<h2>Time and memory per stage</h2>",
        stages_html(run),
        "<h2>Memory plan</h2>",
        plan_html(run),
        "<h2>Settings that differ from the defaults</h2>",
        _table(["setting", "value", "default"], [list(c) for c in changed]) if changed else "<p>None.</p>",
    ]
    for title, data in run.tables.items():
        sections += [f"<h2>{_e(title)}</h2>", json_table(data)]
    if run.versions:
        sections.append(f'<p class="sub">{_e(", ".join(f"{k} {v}" for k, v in run.versions.items()))}</p>')
    title = f"sd3booth: {run.out.resolve().name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>'
            f"<body><main>{''.join(sections)}</main></body></html>\n")  # fmt: skip
