"""Is a safetensors file whole? Its header is read (never its tensors): a truncated, empty or overwritten file,
a missing tensor or one of another shape is reported, so no stage trusts a damaged weight, cache or
checkpoint file."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

# expected shape per tensor name: a tuple of sizes (None: any size) or None (any shape)
Expected = dict[str, tuple[int | None, ...] | None]


def damage(path: Path, expected: Expected | None = None) -> str | None:
    """Why the safetensors file at ``path`` cannot be trusted (None if it can): unreadable header, a file
    shorter or longer than its header says, a missing tensor, or a shape other than ``expected``.
    Reads the header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name, shape in (expected or {}).items():
                if name not in names:
                    return f"no tensor '{name}'"
                if shape is None:
                    continue
                got = tuple(f.get_slice(name).get_shape())
                if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
                    return f"tensor '{name}' has shape {list(got)}, expected {[s if s else '*' for s in shape]}"
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... all mean the same here
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    return None
