"""Reading safetensors weights with plain file reads, never mapping the file.

Written by hand because every library path maps the file (``safetensors.safe_open``, ``load_file`` and the
diffusers/transformers loaders built on them), and mapped file pages count in the process's resident set
(VmRSS = RssAnon + RssFile + RssShmem) until unmapped: loading T5-XXL to the GPU showed its whole 9.5 GB file in
host RSS (issue #10). The format is small: an 8-byte little-endian header length, a JSON header (dtype, shape,
data_offsets per tensor; :func:`sd3booth.models.single_file.read_header` parses it) and the raw bytes. Here
each tensor's bytes are read (``readinto``) straight into its destination when that is host memory of the
same dtype, else through one reusable staging buffer (page-locked on a CUDA run) and copied to the final
device and dtype, so loading costs the staging buffer in host memory, not the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

from sd3booth.errors import UserError
from sd3booth.models import fp8_rows, pinned
from sd3booth.models.single_file import Tensor, read_header
from sd3booth.plan.budget import STAGING_BYTES

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names


def _variant(name: str, variant: str | None) -> str:
    """diffusers' and transformers' ``_add_variant``: the variant goes before the last suffix."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_files(folder: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors files of a component folder as from_pretrained picks them: the variant's single file or
    index (``X.fp16.safetensors``, ``X.safetensors.index.fp16.json``), else the plain ones; shards from the
    index's weight map. None when the folder has no safetensors weights (the caller falls back to the library)."""
    for v in dict.fromkeys([variant, None]):
        for stem in STEMS:
            single = folder / _variant(f"{stem}.safetensors", v)
            if single.is_file():
                return [single]
            index = folder / _variant(f"{stem}.safetensors.index.json", v)
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = [folder / name for name in dict.fromkeys(weight_map.values())]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise UserError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
                return files
    return None


class TensorTable:
    """Every tensor of a component's files by name: (file, dtype, shape, byte range); nothing read yet."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.where: dict[str, tuple[Path, Tensor]] = {}
        for f in files:
            for name, t in read_header(f, f.parent.name).tensors.items():
                if t.dtype not in DTYPES:
                    raise UserError(f"{f}: tensor {name} has dtype {t.dtype}, which this loader cannot read")
                self.where[name] = (f, t)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def describe(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} shards)"


class Reader:
    """Reads tensors of a :class:`TensorTable` into destination tensors, through one staging buffer."""

    def __init__(self, table: TensorTable, pin: bool, staging_bytes: int = STAGING_BYTES) -> None:
        self.table = table
        self.pin = pin
        self.staging_bytes = staging_bytes
        self._staging: torch.Tensor | None = None  # allocated on first use, released with the reader
        self._handles: dict[Path, BinaryIO] = {}
        self.bytes_read = 0

    def _file(self, path: Path) -> BinaryIO:
        if path not in self._handles:
            self._handles[path] = path.open("rb", buffering=0)  # raw reads: no Python-side buffer copy
        return self._handles[path]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._staging = None

    def _read(self, path: Path, offset: int, out: torch.Tensor) -> None:
        """Fills the contiguous CPU tensor ``out`` with the file's bytes from ``offset``."""
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fh = self._file(path)
        fh.seek(offset)
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise UserError(f"{path} ends early (truncated download?); delete it and download it again")
            done += n
        self.bytes_read += done

    def staging(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = pinned.host_buffer(self.staging_bytes, self.pin)
        return self._staging

    def _chunks(self, name: str, row: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element, source elements in the staging buffer) chunk by chunk, whole rows of ``row`` each."""
        path, t = self.table.where[name]
        src_dtype = DTYPES[t.dtype]
        size = torch.empty(0, dtype=src_dtype).element_size()
        numel = (t.end - t.start) // size
        per = max(row, self.staging_bytes // size // row * row)
        if per * size > self.staging_bytes:  # one row larger than the staging buffer: grow it, once
            self.staging_bytes = per * size
            self._staging = None
        for first in range(0, numel, per):
            n = min(per, numel - first)
            chunk = self.staging()[: n * size].view(src_dtype)
            self._read(path, t.start + first * size, chunk)
            yield first, chunk

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Copies tensor ``name`` into ``dst`` (any device and dtype, the file's shape): straight from the file
        into host memory of the same dtype, else through the staging buffer."""
        path, t = self.table.where[name]
        if tuple(dst.shape) != tuple(t.shape):
            raise UserError(f"{path}: tensor {name} has shape {list(t.shape)}, the model expects {list(dst.shape)}")
        if dst.device.type == "cpu" and dst.dtype == DTYPES[t.dtype] and dst.is_contiguous():
            self._read(path, t.start, dst.reshape(-1))
            return
        flat = dst.view(-1)
        for first, chunk in self._chunks(name, 1):
            flat[first : first + chunk.numel()].copy_(chunk)  # synchronous: the staging buffer is reused next

    def read_fp8_rows(
        self, name: str, q: torch.Tensor, scales: torch.Tensor, device: torch.device | None = None
    ) -> None:
        """Quantises 2-D tensor ``name`` into ``q`` (e4m3, its shape) and ``scales`` (one per row), whole rows
        through the staging buffer (:mod:`sd3booth.models.fp8_rows`), the arithmetic on ``device`` (the GPU:
        seconds for SD3.5 Large's swapped blocks, where the CPU takes minutes)."""
        path, t = self.table.where[name]
        rows, cols = t.shape
        if tuple(q.shape) != (rows, cols):
            raise UserError(f"{path}: tensor {name} has shape {list(t.shape)}, the model expects {list(q.shape)}")
        for first, chunk in self._chunks(name, cols):
            a, b = first // cols, (first + chunk.numel()) // cols
            w = chunk.view(b - a, cols).to(device or chunk.device)  # synchronous: the staging buffer is reused
            s = fp8_rows.row_scales(w)
            scales[a:b].copy_(s)
            q[a:b].copy_(fp8_rows.quantize_rows(w, s))


@contextmanager
def open_reader(files: list[Path], pin: bool) -> Iterator[Reader]:
    reader = Reader(TensorTable(files), pin)
    try:
        yield reader
    finally:
        reader.close()
