"""The Linear weights of an SD3 transformer, read one at a time by diffusers name from a diffusers folder or a
single file (Stability's layout, read through the ``sai_keys`` table), without loading the model: what LoRA
extraction needs to fit 8B-parameter checkpoints in little memory."""

from __future__ import annotations

from pathlib import Path

import torch

from sd3booth.errors import UserError
from sd3booth.models.sai_keys import from_sai, is_swapped, swap_halves
from sd3booth.models.single_file import SafetensorsFile, not_sd3, read_header, transformer_prefix


class TransformerWeights:
    """``names()`` lists the diffusers Linear modules; ``get(name)`` reads one weight (its stored dtype)."""

    def __init__(self, model: str, flag: str) -> None:
        p = Path(model).expanduser()
        self.where: dict[str, tuple[Path, str, int | None, bool]] = {}  # name -> (file, key, third, swapped)
        self.shapes: dict[str, tuple[int, ...]] = {}
        if p.is_file():
            self._single_file(read_header(p, flag), flag)
        else:
            from sd3booth.models.source import resolve_model

            self._folder(resolve_model(model).root / "transformer")

    def _folder(self, folder: Path) -> None:
        files = sorted(f for f in folder.glob("*.safetensors") if f.name.count(".") == 1 or "-of-" in f.name)
        for f in files or sorted(folder.glob("*.safetensors")):
            for key, t in read_header(f, "model").tensors.items():
                if key.endswith(".weight") and len(t.shape) == 2:
                    self.where[key[:-7]] = (f, key, None, False)
                    self.shapes[key[:-7]] = t.shape

    def _single_file(self, f: SafetensorsFile, flag: str) -> None:
        prefix = transformer_prefix(f)
        if prefix is None:
            raise not_sd3(f, flag)
        for key, t in f.under(prefix).items():
            if not key.endswith(".weight") or len(t.shape) != 2:
                continue
            names = from_sai(key[:-7])
            swap = is_swapped(key[:-7], t.shape[0], t.shape[1])
            for third, name in enumerate(names):
                part = third if len(names) > 1 else None
                self.where[name] = (f.path, prefix + key, part, swap)
                self.shapes[name] = (t.shape[0] // len(names), t.shape[1])

    def names(self) -> list[str]:
        return sorted(self.where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key, third, swap = self.where[name]
        with safe_open(str(path), framework="pt") as st:
            w = st.get_tensor(key)
        if third is not None:
            w = w.chunk(3, dim=0)[third]
        return swap_halves(w) if swap else w


def matching(names: list[str], layers: list[str] | None) -> list[str]:
    """The names that end with one of ``layers`` (the --lora_layers rule); all of them for None."""
    if layers is None:
        return list(names)
    chosen = [n for n in names if any(n == layer or n.endswith("." + layer) for layer in layers)]
    missing = [layer for layer in layers if not any(n == layer or n.endswith("." + layer) for n in names)]
    if missing:
        raise UserError(f"--lora_layers {','.join(missing)} match no Linear layer of the transformer")
    return chosen
