"""report.html of a run folder: rewritten at each validation and at the end of training, or by ``sd3booth report``.

``read`` gathers the run's files, ``charts`` draws the SVG charts, ``page`` writes the HTML.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd3booth.cache.store import atomic_write_bytes
from sd3booth.errors import UserError
from sd3booth.report.page import REPORT_FILE, generate_command, render
from sd3booth.report.read import read_run


def write_report(out: Path, stages: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Writes OUT/report.html (atomically: a browser refreshing it never sees half a page); returns its path.

    A run in progress passes its ``stages`` so far and its ``settings`` (stages.json and settings.json are
    written later: at the end, and once something is saved).
    """
    path = Path(out) / REPORT_FILE
    atomic_write_bytes(path, render(read_run(Path(out), stages, settings)).encode("utf-8"))
    return path


def write_report_safely(
    out: Path, stages: list[dict[str, Any]], settings: dict[str, Any], say: Callable[[str], None]
) -> Path | None:
    """:func:`write_report` for a run in progress: a failure is one warning line, never the end of training."""
    try:
        return write_report(out, stages, settings)
    except Exception as e:  # noqa: BLE001 - a page is not worth losing a training run for
        say(f"warning: {Path(out) / REPORT_FILE} not written ({type(e).__name__}: {e})")
        return None


def report_command(out: Path) -> Path:
    """``sd3booth report OUT``: rebuilds the report of any run folder."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"report: {out} is not a folder; pass the --output_dir of a training run")
    if not any((out / f).is_file() for f in ("settings.json", "metrics.jsonl", "stages.json")):
        raise UserError(f"report: {out} holds no run (no settings.json or metrics.jsonl); pass a run's --output_dir")
    return write_report(out)


__all__ = ["REPORT_FILE", "generate_command", "report_command", "write_report", "write_report_safely"]
