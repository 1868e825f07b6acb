"""The report's charts as inline SVG (matplotlib's object API, no pyplot: no GUI backend, no global state)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

SMOOTHING = 0.8  # weight of the moving average of the loss (TensorBoard's slider, same debiased formula)
_BLUE, _ORANGE, _GREEN, _GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (TensorBoard's): the first points are not pulled towards zero."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _svg(fig: Any) -> str:
    """The figure as an <svg> element: text stays text (smaller, searchable), ids are stable between rewrites."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sd3booth"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(rows: int, height: float) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def training_svg(metrics: list[dict[str, Any]]) -> str | None:
    """Loss (raw and smoothed), learning rate, s/step and peak GPU memory against the step; None without data."""
    rows = [m for m in metrics if "step" in m and "loss" in m]
    if not rows:
        return None
    steps = [m["step"] for m in rows]
    few = len(rows) < 30
    panels: list[tuple[str, str, list[float]]] = [("loss", "loss", [m["loss"] for m in rows])]
    for key, label in (("lr", "learning rate"), ("s_per_step", "seconds / step"), ("peak_gpu_gib", "peak GPU GiB")):
        values = [m.get(key) for m in rows]
        if any(v for v in values):
            panels.append((key, label, [v if v is not None else float("nan") for v in values]))
    fig, axes = _figure(len(panels), 2.0)
    for ax, (key, label, values) in zip(axes, panels):
        if key == "loss":
            ax.plot(steps, values, color=_BLUE, alpha=0.35, lw=1, marker="o" if few else None, ms=3, label="raw")
            ax.plot(steps, smooth(values), color=_BLUE, lw=2, label=f"smoothed ({SMOOTHING})")
            ax.legend(loc="upper right", frameon=False, fontsize=8)
        else:
            ax.plot(steps, values, color={"lr": _ORANGE, "s_per_step": _GREEN}.get(key, _GREY), lw=1.5,
                    marker="o" if few else None, ms=3)  # fmt: skip
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylabel(label)
    axes[-1].set_xlabel("step")
    return _svg(fig)


def memory_svg(stages: list[dict[str, Any]]) -> str | None:
    """Peak GPU (allocated, whole process) and host memory of each stage as bars; None when none was measured."""
    known = (("peak_allocated_gib", "GPU allocated", _BLUE), ("peak_process_gpu_gib", "GPU whole process", _GREY),
             ("peak_host_rss_gib", "host RSS", _ORANGE))  # fmt: skip
    series = [(k, label, c) for k, label, c in known if any(s.get(k) for s in stages)]
    if not stages or not series:
        return None
    from matplotlib.figure import Figure

    names = [s["stage"] for s in stages]
    fig = Figure(figsize=(9, 0.8 + 0.32 * len(names) * len(series)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for i, (key, label, color) in enumerate(series):
        ys = [j + i * height for j in range(len(names))]
        ax.barh(ys, [s.get(key, 0.0) for s in stages], height=height, color=color, label=label)
    ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("GiB")
    ax.grid(True, axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(loc="outside upper right", ncols=len(series), frameon=False, fontsize=8)
    return _svg(fig)
