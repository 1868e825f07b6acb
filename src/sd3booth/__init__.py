"""sd3booth: DreamBooth LoRA training for Stable Diffusion 3 / 3.5."""

import logging
import os

__version__ = "0.1.0"


def configure_environment() -> None:
    """Library settings every command runs with. They must be set before CUDA starts: the CLI applies them
    first thing, and ``sd3booth.bench.capped`` before it caps the GPU memory and runs the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # import-time chatter about optional CPU kernels
    # fewer fragments, so reserved memory stays close to allocated (the budgets are on allocated memory)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
