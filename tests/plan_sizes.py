"""True-size SD3 checkpoints as the planner reads them (plan.sizes.ModelSizes), without writing any weights: the
transformer is built on the meta device from the architectures ``sd3booth random-model`` writes (so its counts are
exact, position-embedding buffer included), the text encoders and VAE are the published SD3 ones (the same in
every SD3 model)."""

from __future__ import annotations

import functools

from sd3booth.plan.sizes import ModelSizes

# CLIP-L, CLIP-G, T5-XXL (its tied embedding stored once), VAE: parameter counts of the published files
ENCODERS = dict(
    clip_l_params=123_650_304, clip_g_params=694_659_840, t5_params=4_762_310_656, t5_layer_params=192_948_224,
    vae_params=83_819_683, t5_wo_params=1_006_632_960,
)  # fmt: skip
FILE_BYTES = {"text_encoder": 247_323_896, "text_encoder_2": 1_389_382_176, "text_encoder_3": 9_524_621_344}


@functools.cache
def true_sizes(arch: str) -> ModelSizes:
    """ModelSizes of a random-model ``arch`` (sd3-medium, sd3.5-medium, sd3.5-large) at true size."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sd3booth.random_model import get_arch

    config = get_arch(arch).transformer
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    blocks: dict[int, int] = {}
    other = 0
    for name, t in model.state_dict().items():  # state_dict: the stored pos_embed buffer counts (0.1 GiB at bf16)
        if name.startswith("transformer_blocks."):
            i = int(name.split(".")[1])
            blocks[i] = blocks.get(i, 0) + t.numel()
        else:
            other += t.numel()
    total = sum(blocks.values()) + other
    return ModelSizes(
        n_blocks=config["num_layers"], block_params=max(blocks.values()), other_params=other,
        hidden=config["num_attention_heads"] * config["attention_head_dim"], **ENCODERS,
        file_bytes={**FILE_BYTES, "transformer": 2 * total, "vae": 2 * ENCODERS["vae_params"]},
    )  # fmt: skip
