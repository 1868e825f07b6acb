"""Helpers shared by the CLI test modules: run ``sd3booth.cli.main`` and capture its output, hash a folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import pytest

from sd3booth.cli import main


def run_quiet(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured without capsys (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
