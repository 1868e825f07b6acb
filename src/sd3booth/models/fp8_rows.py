"""fp8 (e4m3) copies of frozen Linear weights with one power-of-two scale per output row.

Used for swapped blocks' host copies when bf16 copies do not fit ``--max_ram`` (``--swap_dtype fp8``): half the
host memory and half the PCIe traffic; the copy is upcast on the GPU after it lands (a copy then an in-place
multiply per weight, into the same device buffer as a bf16 copy). The scale is a power of two so that the
upcast is exact in bf16: the only error is e4m3's 3-bit mantissa, a relative error of at most 2**-4 per weight
(2.7% RMS over a Gaussian weight matrix, measured), as with any per-row scale: a floating-point format's
relative precision does not depend on the scale as long as nothing falls below e4m3's normal range.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """One power-of-two scale per row (fp32): the smallest with ``|w| / scale <= 448`` everywhere in the row."""
    amax = w.detach().abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))


def quantize_rows(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``w / scale`` per row, in e4m3 (round to nearest)."""
    return (w.detach().float() / scales[:, None]).to(FP8)


def dequantize_rows_(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Writes ``q * scale`` per row into ``out`` (its dtype, e.g. bf16) without a temporary: a cast-copy, then an
    in-place multiply by the power-of-two scale (exact)."""
    out.copy_(q)
    return out.mul_(scales[:, None])
