"""FP8 compute for the frozen base (``--base_compute fp8``): the frozen GEMMs of the transformer blocks run as
fp8 (e4m3) matmuls with row-wise scales, in the forward and in the input gradient of the backward.

Why by hand rather than torchao's ``Float8Linear``: torchao always computes the weight gradient, whose GEMM has
the token count as its inner dimension, and ``torch._scaled_mm`` needs that to be a multiple of 16 — SD3's
333 text tokens (77 CLIP + 256 T5) fail at compile time (measured on the H100, 2026-11-25); it also casts the
frozen weight again at every step. Here a frozen weight is quantised once (per output row for the forward, per
input column for the backward, both kept in e4m3: the same 2 bytes per parameter as bf16, whose copy is
dropped), activations and incoming gradients are quantised per row on the fly, and no weight gradient exists.
The LoRA path (peft's A/B matmuls wrapped around the base layer) and its gradients stay in bf16/fp32.
Needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper and newer). On the CPU (tests) the same quantised
operands are multiplied in fp32, so the numerics of the quantisation are tested there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP8_MIN_CAPABILITY = (8, 9)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, the fp32 scale of each row, shape (rows, 1)): x ~= q * scale, each row's amax mapped to 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_mm(
    a: torch.Tensor, sa: torch.Tensor, b_t: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:  # noqa: E501
    """(a * sa) @ (b_t * sb).T for a (M, K) and b_t (N, K) in e4m3 with row scales sa (M, 1) and sb (N, 1)."""
    if a.is_cuda:  # cuBLASLt's fp8 GEMM wants the second operand column-major: b_t row-major, transposed
        return torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb.reshape(1, -1), out_dtype=dtype)
    return ((a.float() * sa) @ (b_t.float() * sb).t()).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, wt: torch.Tensor, swt: torch.Tensor):
        ctx.save_for_backward(wt, swt)
        ctx.dtype = x.dtype
        q, s = quantise_rows(x)
        return scaled_mm(q, s, w, sw, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        wt, swt = ctx.saved_tensors
        q, s = quantise_rows(grad)
        return scaled_mm(q, s, wt, swt, ctx.dtype), None, None, None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives as e4m3 twice (W for the forward, W^T for the input gradient),
    each with its own row scales; the bias stays in its dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        q, s = quantise_rows(w)
        qt, st = quantise_rows(w.t().contiguous())
        self.register_buffer("w", q)
        self.register_buffer("sw", s)
        self.register_buffer("wt", qt)
        self.register_buffer("swt", st)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.weight_dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _Fp8Matmul.apply(x.reshape(-1, shape[-1]).to(self.weight_dtype), self.w, self.sw, self.wt, self.swt)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-scaled"


def _frozen_gemm(module: nn.Module, fqn: str) -> bool:
    if type(module) is not nn.Linear or module.weight.requires_grad:
        return False
    if ".norm" in f".{fqn}" or "lora_" in fqn:  # AdaLN layers see one token: a GEMV, where scaling costs more
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0  # torch._scaled_mm's rule


def apply_fp8_compute(blocks: nn.Module) -> int:
    """Replaces the frozen GEMMs inside ``blocks`` (the ``transformer_blocks`` list; for a LoRA layer its
    ``base_layer``) by :class:`Fp8FrozenLinear`; returns how many layers were replaced."""
    chosen = [(name, mod) for name, mod in blocks.named_modules() if _frozen_gemm(mod, name)]
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, Fp8FrozenLinear(mod))
    return len(chosen)
