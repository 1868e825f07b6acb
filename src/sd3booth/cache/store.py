"""Content-keyed tensor files on disk: the only way stages hand data to each other.

Each entry is one safetensors file named by a hash of everything that determines its content, written
to a temporary name and renamed, so a crash never leaves a half-written entry that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sd3booth.fileio import as_if_created


def content_key(**parts: Any) -> str:
    """sha256 of the parts (sorted, JSON-encoded): same parts, same key, across runs and machines."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class TensorStore:
    """A folder of ``<key>.safetensors`` entries."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
            as_if_created(tmp)  # mkstemp makes 0600; the cache is shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(key))
