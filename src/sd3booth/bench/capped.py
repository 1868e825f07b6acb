"""``python -m sd3booth.bench.capped GIB ARGS...``: the sd3booth CLI (``ARGS``) with this process's GPU memory
capped at ``GIB`` (``torch.cuda.set_per_process_memory_fraction``), so a run that needs more fails with an
out-of-memory error. The budget runs of ``sd3booth bench`` start their ``sd3booth train`` this way; the
trainer itself knows nothing of the cap."""

from __future__ import annotations

import sys

GIB = 2**30


def cap_fraction(gib: float, total_bytes: int) -> float:
    """The fraction of a device of ``total_bytes`` that is ``gib`` GiB (at most all of it)."""
    return min(1.0, gib * GIB / total_bytes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m sd3booth.bench.capped GIB [sd3booth arguments...]", file=sys.stderr)
        return 2
    gib, rest = float(argv[0]), argv[1:]
    from sd3booth import cli

    cli.configure_environment()  # before CUDA starts: the allocator reads its settings once
    import torch

    device = torch.cuda.current_device()
    fraction = cap_fraction(gib, torch.cuda.get_device_properties(device).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
