"""LoRA tools: mix several LoRAs, change a LoRA's rank, describe a file. Pure tensor maths on
:data:`~sd3booth.adapters.layouts.Modules`.

Every result is the SVD of the exact weight change. For LoRAs the change ``U @ D`` is never formed: with
``U = Qu Ru`` and ``D^T = Qd Rd`` (thin QR), ``U @ D = Qu (Ru Rd^T) Qd^T``, so the SVD of the small
``r x r`` core gives the SVD of the full ``out x in`` change exactly, in microseconds per layer. Written by
hand because no library re-factorises sums of LoRAs (kohya's resize and merge scripts form the dense matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sd3booth.adapters.layouts import LoraFile, Modules
from sd3booth.errors import UserError
from sd3booth.models.weights import TransformerWeights


def lowrank_svd(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) with ``up @ down == U @ diag(S) @ Vh`` exactly, computed from the factors (fp32)."""
    qu, ru = torch.linalg.qr(up.float())
    qd, rd = torch.linalg.qr(down.float().T)
    uc, s, vhc = torch.linalg.svd(ru @ rd.T)
    return qu @ uc, s, vhc @ qd.T


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least ``energy`` of the squared Frobenius norm."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the best rank-``rank`` approximation, singular values split evenly between the two."""
    root = s[:rank].clamp(min=0).sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root[None]).contiguous()


@dataclass
class Report:
    """How much of the exact weight change the result keeps: energy = squared Frobenius norm."""

    kept: float = 0.0
    total: float = 0.0
    worst: tuple[str, float] = ("", 0.0)  # (layer, its relative error)
    ranks: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, s: torch.Tensor, rank: int) -> None:
        e = (s.double() ** 2).tolist()
        kept, total = sum(e[:rank]), sum(e)
        self.kept, self.total = self.kept + kept, self.total + total
        err = math.sqrt(max(total - kept, 0.0) / total) if total else 0.0
        if err >= self.worst[1]:
            self.worst = (name, err)
        self.ranks[name] = rank

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 1.0

    @property
    def relative_error(self) -> float:
        """||exact - result||_F / ||exact||_F over all layers together."""
        return math.sqrt(max(1.0 - self.kept_fraction, 0.0))

    def describe(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks else "-"
        worst = f"; worst layer {self.worst[0]} {self.worst[1]:.2%}" if self.worst[0] else ""
        return (
            f"{len(self.ranks)} layers, rank {rank}: kept {self.kept_fraction:.4%} of the energy, relative error "
            f"{self.relative_error:.3%}{worst}"
        )


def _choose(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank asked for, else the one keeping ``energy``, else the numerical rank (exact)."""
    if energy is not None:
        r = rank_for_energy(s, energy)
    elif rank is not None:
        r = rank
    else:
        r = int((s > s[0] * 1e-6).sum()) if len(s) and s[0] > 0 else 1
    return max(1, min(r, len(s)))


def merge(
    loras: list[tuple[Modules, float]], rank: int | None = None, energy: float | None = None
) -> tuple[Modules, Report]:
    """sum_i w_i * delta_i for every layer any input has, re-factorised by SVD to ``rank`` (default: the exact
    rank of the sum; or the smallest keeping ``energy``)."""
    names = sorted({n for modules, _ in loras for n in modules})
    out: Modules = {}
    report = Report()
    for name in names:
        parts = [(m[name], w) for m, w in loras if name in m]
        down = torch.cat([d.float() for (d, _u), _w in parts], dim=0)
        up = torch.cat([u.float() * w for (_d, u), w in parts], dim=1)
        u, s, vh = lowrank_svd(down, up)
        r = _choose(s, rank, energy)
        report.add(name, s, r)
        out[name] = factors(u, s, vh, r)
    return out, report


def resize(modules: Modules, rank: int | None = None, energy: float | None = None) -> tuple[Modules, Report]:
    """Every layer to ``rank`` (or the smallest rank keeping ``energy`` of it), by SVD of its exact change."""
    return merge([(modules, 1.0)], rank, energy)


def svd_truncate(
    diff: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(down, up, singular values, chosen rank) of a dense weight difference, on its device, in fp32."""
    u, s, vh = torch.linalg.svd(diff.float(), full_matrices=False)
    r = _choose(s, rank, energy)
    down, up = factors(u, s, vh, r)
    return down, up, s, r


def extract(
    base: TransformerWeights,
    tuned: TransformerWeights,
    names: list[str],
    rank: int | None,
    energy: float | None,
    device: torch.device,
) -> tuple[Modules, Report, list[str]]:
    """A LoRA of ``tuned - base`` on each named Linear, layer by layer on ``device`` (only two weights and
    their difference are there at a time); returns the layers that did not change apart."""
    out: Modules = {}
    report = Report()
    unchanged = []
    for name in names:
        if name not in tuned.shapes or tuned.shapes[name] != base.shapes[name]:
            raise UserError(
                f"--tuned has no layer {name} of shape {tuple(base.shapes[name])}; base and tuned must be the same SD3"
            )
        diff = tuned.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)
        if not torch.any(diff):
            unchanged.append(name)
            continue
        down, up, s, r = svd_truncate(diff, rank, energy)
        report.add(f"transformer.{name}", s.cpu(), r)
        out[f"transformer.{name}"] = (down.cpu(), up.cpu())
        del diff
    return out, report, unchanged


def describe(lf: LoraFile) -> list[str]:
    """The lines of ``sd3booth lora info``: format, rank, alpha, targets, base model and training settings."""
    by_comp: dict[str, int] = {}
    kinds: dict[str, int] = {}
    blocks: set[int] = set()
    for name in lf.modules:
        comp, inner = name.split(".", 1)
        by_comp[comp] = by_comp.get(comp, 0) + 1
        parts = inner.split(".")
        if comp == "transformer" and parts[0] == "transformer_blocks":
            blocks.add(int(parts[1]))
            inner = ".".join(parts[2:])
        elif comp != "transformer":
            inner = f"{comp}: " + ".".join(p for p in parts if not p.isdigit())
        kinds[inner] = kinds.get(inner, 0) + 1
    ranks = lf.ranks
    lines = [
        f"file: {lf.path} ({lf.path.stat().st_size / 2**20:.1f} MiB, {str(lf.dtype).removeprefix('torch.')})",
        f"format: {lf.format}",
        f"layers: {len(lf.modules)} ({', '.join(f'{c} {n}' for c, n in sorted(by_comp.items()))})",
        f"rank: {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]} (varies by layer)'}",
        "alpha: " + (", ".join(f"{a:g}" for a in lf.alphas) if lf.alphas else "none stored (alpha = rank)"),
        f"targets: {', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}",
    ]
    if blocks:
        lines.append(f"blocks: {_ranges(sorted(blocks))}")
    for key in sorted(lf.metadata):
        if key in ("format", "lora_adapter_metadata") or key.startswith("ss_tag_frequency"):
            continue
        value = lf.metadata[key].replace("\n", " ")
        lines.append(f"{key}: {value[:200]}{'…' if len(value) > 200 else ''}")
    return lines


def _ranges(values: list[int]) -> str:
    out, start = [], values[0]
    for a, b in zip(values, [*values[1:], None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
