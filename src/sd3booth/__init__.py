"""sd3booth: DreamBooth LoRA training for Stable Diffusion 3 / 3.5."""

__version__ = "0.1.0"
