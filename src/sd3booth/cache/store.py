"""Content-keyed tensor files on disk: the only way stages hand data to each other.

Each entry is one safetensors file named by a hash of everything that determines its content, written
to a temporary name and renamed, so a crash never leaves a half-written entry that looks valid. The
temporary name carries the writer's process id: a later start removes the temporaries of writers that
are gone (a kill -9 mid-write) and leaves those of a live run sharing the cache alone. An entry that is
damaged anyway (a truncated copy, a full disk in another tool, bit rot in the header) is never trusted:
``usable`` checks it, names it in a warning, deletes it, and the caching stage encodes it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sd3booth.errors import UserError
from sd3booth.fileio import as_if_created
from sd3booth.models.files import Expected, damage

# room kept free beside anything written: a disk filled to the last byte breaks more than this program
FREE_SPACE_RESERVE = 16 * 2**20
STALE_SECONDS = 3600  # a temporary older than this is abandoned even if its process id is alive (reused)
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]*\.tmp$")


def content_key(**parts: Any) -> str:
    """sha256 of the parts (sorted, JSON-encoded): same parts, same key, across runs and machines."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_free_space(folder: Path, needed: int, what: str, advice: str) -> None:
    """UserError (one line) unless ``folder``'s disk has ``needed`` bytes plus the reserve free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < needed + FREE_SPACE_RESERVE:
        raise UserError(
            f"not enough free space in {folder} to write {what}: it needs about {_mib(needed)} plus "
            f"{_mib(FREE_SPACE_RESERVE)} spare, {_mib(free)} are free; {advice}"
        )


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary for ``name``: hidden, and naming this process (see ``clean_temporaries``)."""
    return f".{name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def clean_temporaries(folder: Path) -> list[Path]:
    """Removes the ``.<name>.<pid>-*.tmp`` files in ``folder`` whose writer is gone; returns them."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not (p.name.startswith(".") and p.name.endswith(".tmp")) or not p.is_file():
            continue
        try:
            old = now - p.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        if old or (m is not None and not _pid_alive(int(m["pid"]))):  # names without a pid: older versions
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        as_if_created(tmp)  # mkstemp makes 0600; settings.json and logs are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TensorStore:
    """A folder of ``<key>.safetensors`` entries."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def usable(self, key: str, expected: Expected | None = None, on_damage: Callable[[str], None] = warn) -> bool:
        """True if the entry exists and is sound; a damaged entry is named through ``on_damage``, deleted,
        and reported missing, so the caller encodes it again."""
        p = self.path(key)
        if not p.is_file():
            return False
        reason = damage(p, expected)
        if reason is None:
            return True
        on_damage(f"cache entry {p} is damaged ({reason}); deleted, it is encoded again")
        p.unlink(missing_ok=True)
        return False

    def clean_temporaries(self) -> list[Path]:
        return clean_temporaries(self.root)

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
        check_free_space(
            self.root, needed, f"cache entry {key}", "free some space, or pass --cache_dir on a disk with room"
        )
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=tmp_prefix(key), suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            as_if_created(tmp)  # mkstemp makes 0600; the cache is shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors; a damaged entry is deleted and reported as one UserError line."""
        p = self.path(key)
        try:
            return load_file(p)
        except Exception as e:  # noqa: BLE001 - SafetensorError does not name the file
            if p.is_file():
                p.unlink(missing_ok=True)
                raise UserError(
                    f"cache entry {p} is damaged ({type(e).__name__}: {e}); it was deleted: run the same "
                    "command again to encode it again".replace("\n", " ")
                ) from None
            raise UserError(
                f"cache entry {p} is missing (deleted while this run was starting?); run the same command again"
            ) from None
