"""File modes: what ``tempfile`` creates privately (0600 files, 0700 folders) is given the modes a plain
``open``/``mkdir`` would have had under the user's umask before it is renamed into place, so other users
and containers (a ComfyUI install, a shared cache) can read LoRA, cache and checkpoint files."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_root() -> Path:
    """sd3booth's folder in the user's cache (``$XDG_CACHE_HOME/sd3booth``, else ``~/.cache/sd3booth``): what
    outlives a run and is shared by every run of this user (converted single files, compiled blocks)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sd3booth"


def umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> None:
    """Gives a file 0666 and a folder 0777 (with everything inside it), less the umask."""
    p = Path(path)
    mask = umask()
    if p.is_dir():
        for sub in [p, *p.rglob("*")]:
            os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(p, 0o666 & ~mask)
