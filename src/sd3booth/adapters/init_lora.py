"""``--init_lora``: start training from an existing LoRA (diffusers, kohya or ComfyUI layout).

The file's transformer layers become the adapter's starting weights: ``B A`` of the new adapter, times its
alpha / rank scale, equals the file's weight change. A file of higher rank than ``--rank`` is cut by SVD (the
kept share is reported); a lower rank is padded with random A rows and zero B columns, so the change is exact
and the new directions can still learn (a zero row of A would never receive a gradient).
"""

from __future__ import annotations

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sd3booth.adapters import layouts, tools
from sd3booth.errors import UserError


def read_init(path: str) -> layouts.Modules:
    """The transformer layers of the file (module name without the ``transformer.`` prefix)."""
    lf = layouts.read_lora(path, "--init_lora")
    modules = {k.removeprefix("transformer."): v for k, v in lf.modules.items() if k.startswith("transformer.")}
    if not modules:
        raise UserError(f"--init_lora {path} has no transformer layers (only text-encoder ones); nothing to start from")
    return modules


def check_fits(net: torch.nn.Module, modules: layouts.Modules, targets: list[str] | None, path: str) -> None:
    """Every layer of the file must be a Linear of this transformer with the same shape, and (when --lora_layers
    is given) one of the trained targets."""
    linears = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    bad = [
        n
        for n, (d, u) in modules.items()
        if n not in linears or tuple(linears[n].weight.shape) != (u.shape[0], d.shape[1])
    ]
    if bad:
        raise UserError(
            f"--init_lora {path}: {len(bad)} of its {len(modules)} layers do not fit this model (e.g. {bad[0]}); "
            "is it a LoRA for another SD3 model?"
        )
    if targets is not None:
        outside = [n for n in modules if not any(n == t or n.endswith("." + t) for t in targets)]
        if outside:
            raise UserError(
                f"--init_lora {path} has {len(outside)} layer(s) outside --lora_layers (e.g. {outside[0]}); add their "
                "names to --lora_layers, or leave --lora_layers out to train exactly the file's layers"
            )


def fit_rank(
    down: torch.Tensor, up: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B) of rank ``rank`` with B @ A as close to up @ down as that rank allows; the share of energy kept."""
    r = down.shape[0]
    if r > rank:
        u, s, vh = tools.lowrank_svd(down, up)
        a, b = tools.factors(u, s, vh, rank)
        total = float((s.double() ** 2).sum())
        return a, b, float((s[:rank].double() ** 2).sum()) / total if total else 1.0
    if r < rank:
        extra = torch.randn(rank - r, down.shape[1], generator=generator) / rank  # peft's "gaussian" init scale
        return torch.cat([down.float(), extra]), torch.cat([up.float(), torch.zeros(up.shape[0], rank - r)], 1), 1.0
    return down.float(), up.float(), 1.0


def apply_init(net: torch.nn.Module, modules: layouts.Modules, rank: int, alpha: int, seed: int) -> str:
    """Sets the adapter's weights from the file; returns the line to report."""
    state = get_peft_model_state_dict(net)
    g = torch.Generator().manual_seed(seed)  # its own generator: the run's random streams are untouched
    scale = alpha / rank
    kept = []
    for name, (down, up) in sorted(modules.items()):
        a, b, share = fit_rank(down, up, rank, g)
        key = f"{name}.lora_A.weight"
        state[key] = a.to(state[key].dtype)
        state[f"{name}.lora_B.weight"] = (b / scale).to(state[key].dtype)
        kept.append(share)
    set_peft_model_state_dict(net, state)
    ranks = sorted({d.shape[0] for d, _u in modules.values()})
    cut = f", cut to rank {rank} keeping {min(kept):.2%} of the worst layer" if min(kept) < 1.0 else ""
    return f"starting from --init_lora: {len(modules)} layers of rank {'/'.join(map(str, ranks))}{cut}"
