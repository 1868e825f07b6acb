"""``python -m sd3booth.bench.capped GIB ARGS...``: ``python -m sd3booth ARGS...`` with this process's GPU
memory capped at ``GIB`` (``torch.cuda.set_per_process_memory_fraction``), so a run that needs more fails with
an out-of-memory error. The budget runs of ``sd3booth bench`` start their ``sd3booth train`` this way; the
trainer itself knows nothing of the cap. A launcher, like ``sd3booth/__main__.py``: it runs the CLI as a
program (``runpy``) rather than importing it."""

from __future__ import annotations

import runpy
import sys

GIB = 2**30


def cap_fraction(gib: float, total_bytes: int) -> float:
    """The fraction of a device of ``total_bytes`` that is ``gib`` GiB (at most all of it)."""
    return min(1.0, gib * GIB / total_bytes)


def run_program(args: list[str]) -> int:
    """``python -m sd3booth ARGS`` in this process; its exit status."""
    sys.argv = ["sd3booth", *args]
    try:
        runpy.run_module("sd3booth", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m sd3booth.bench.capped GIB [sd3booth arguments...]", file=sys.stderr)
        return 2
    gib, rest = float(argv[0]), argv[1:]
    from sd3booth import configure_environment

    configure_environment()  # before CUDA starts: the allocator reads its settings once
    import torch

    if torch.cuda.is_available():  # else a CPU dry run of a GPU tool: nothing to cap
        device = torch.cuda.current_device()
        fraction = cap_fraction(gib, torch.cuda.get_device_properties(device).total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return run_program(rest)


if __name__ == "__main__":
    sys.exit(main())
