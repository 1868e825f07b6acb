"""ComfyUI's LoRA loading rules for SD3, restated as test data and logic (read from comfyanonymous/ComfyUI:
comfy/lora.py ``model_lora_keys_unet``/``model_lora_keys_clip``/``load_lora``, comfy/utils.py
``mmdit_to_diffusers`` and comfy/weight_adapter/{base,lora,loha,lokr}.py; not its code).

What ComfyUI does with a file, in short:
* key names: for an SD3 model, every diffusers transformer module ``d`` is reachable as ``transformer.d``,
  ``base_model.model.d``, ``lora_transformer_<d with _>`` and ``lycoris_<d with _>``; q/k/v (and the context
  stream's add_q/k/v) land in thirds of the fused SAI ``qkv`` weight; CLIP-L's layers as
  ``text_encoder.text_model.encoder.layers.<b>.<m>`` and CLIP-G's under ``text_encoder_2.`` (m: the q/k/v/out
  projections and the two MLP layers);
* per module it reads ``.alpha`` and ``.dora_scale``, then the first adapter whose keys are present: LoRA
  (``lora_up/lora_down``, ``lora_B/lora_A``, …), LoHa (``hada_*``) or LoKr (``lokr_*``); any key left unread
  is logged as "lora key not loaded";
* merging: LoRA up@down, LoHa (w1a@w1b)*(w2a@w2b), LoKr kron(w1, w2) (each factor possibly a product), scaled
  by alpha / (the inner dimension) when alpha is given, else 1 (LoKr: 1 when both factors are full); with a
  ``dora_scale`` of the weight's row count, the merged weight is rescaled row-wise by dora_scale / (row norm
  of the *original* weight + eps); with one of its column count, by the column norms of the merged weight.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps
# diffusers module -> (SAI weight, third of the fused qkv or None)
SD3_BLOCK_MAP = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
}
CLIP_LAYER_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                      "self_attn.out_proj")  # fmt: skip
LORA_NAME_PAIRS = (  # (up, down) suffixes ComfyUI tries, in its order
    ("lora_up.weight", "lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    ("lora_B.weight", "lora_A.weight"),
    ("lora.up.weight", "lora.down.weight"),
    ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),
)
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def sd3_key_map(n_blocks: int, hidden: int) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """file module name -> (SAI weight key, (row offset, rows) or None)."""
    out = {}
    for i in range(n_blocks):
        for d, (sai, third) in SD3_BLOCK_MAP.items():
            module = f"transformer_blocks.{i}.{d}"
            target = (f"joint_blocks.{i}.{sai}.weight", None if third is None else (third * hidden, hidden))
            flat = module.replace(".", "_")
            for name in (f"transformer.{module}", f"base_model.model.{module}", f"lora_transformer_{flat}",
                         f"lycoris_{flat}"):  # fmt: skip
                out[name] = target
    return out


def clip_key_map(n_layers: dict[str, int]) -> dict[str, tuple[str, None]]:
    """``text_encoder`` -> clip_l, ``text_encoder_2`` -> clip_g (CLIP-L present)."""
    out = {}
    for prefix, clip in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        for b in range(n_layers[prefix]):
            for m in CLIP_LAYER_MODULES:
                key = f"text_model.encoder.layers.{b}.{m}"
                out[f"{prefix}.{key}"] = (f"{clip}.{key}.weight", None)
    return out


def load(file: dict[str, torch.Tensor], key_map: dict) -> tuple[list[tuple], set[str]]:
    """(patches: (target, offset, kind, tensors, alpha, dora_scale), keys read)."""
    patches, read = [], set()
    for x, (target, offset) in key_map.items():
        alpha = file.get(f"{x}.alpha")
        dora = file.get(f"{x}.dora_scale")
        read.update(k for k in (f"{x}.alpha", f"{x}.dora_scale") if k in file)
        alpha = None if alpha is None else float(alpha)
        for up, down in LORA_NAME_PAIRS:
            sep = "" if up.startswith("_") else "."
            if f"{x}{sep}{up}" in file:
                ks = (f"{x}{sep}{up}", f"{x}{sep}{down}")
                read.update(ks)
                patches.append((target, offset, "lora", [file[k] for k in ks], alpha, dora))
                break
        else:
            if f"{x}.hada_w1_a" in file:
                ks = [f"{x}.{p}" for p in LOHA]
                read.update(k for k in ks if k in file)
                patches.append((target, offset, "loha", [file.get(k) for k in ks], alpha, dora))
            elif any(f"{x}.{p}" in file for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
                ks = [f"{x}.{p}" for p in LOKR]
                read.update(k for k in ks if k in file)
                patches.append((target, offset, "lokr", [file.get(k) for k in ks], alpha, dora))
    return patches, read


def _decompose(dora: torch.Tensor, w: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    merged = w + diff
    if dora.shape[0] == merged.shape[0]:
        norm = w.norm(dim=1, keepdim=True)  # the original weight's rows: ComfyUI's output-axis rule
    else:
        norm = merged.norm(dim=0, keepdim=True)
    return merged * (dora / (norm + EPS))


def patch_weight(w: torch.Tensor, kind: str, t: list, alpha: float | None, dora: torch.Tensor | None) -> torch.Tensor:
    if kind == "lora":
        up, down = t
        diff, inner = up @ down, down.shape[0]
    elif kind == "loha":
        w1a, w1b, w2a, w2b, _t1, _t2 = t
        diff, inner = (w1a @ w1b) * (w2a @ w2b), w1b.shape[0]
    else:
        w1, w2, w1a, w1b, w2a, w2b, _t2 = t
        inner = None
        if w1 is None:
            inner, w1 = w1b.shape[0], w1a @ w1b
        if w2 is None:
            inner, w2 = w2b.shape[0], w2a @ w2b
        diff = torch.kron(w1, w2)
        if inner is None:
            alpha = None  # both factors full: alpha does not apply
    scale = alpha / inner if alpha is not None else 1.0
    diff = scale * diff.reshape(w.shape)
    return _decompose(dora, w, diff) if dora is not None else w + diff


def merge(weights: dict[str, torch.Tensor], patches: list[tuple]) -> dict[str, torch.Tensor]:
    out = {k: v.clone().float() for k, v in weights.items()}
    for target, offset, kind, tensors, alpha, dora in patches:
        w = out[target]
        view = w.narrow(0, *offset) if offset else w
        view.copy_(patch_weight(view.clone(), kind, [None if x is None else x.float() for x in tensors], alpha, dora))
    return out


def sai_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The SAI-layout weights ComfyUI holds for a diffusers SD3 transformer (the adapted modules only)."""
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    out = {}
    modules = dict(transformer.named_modules())
    for i in range(len(transformer.transformer_blocks)):
        for d, (sai, third) in SD3_BLOCK_MAP.items():
            m = modules.get(f"transformer_blocks.{i}.{d}")
            if m is None:
                continue
            w = getattr(m, "base_layer", m).weight.detach().float()
            key = f"joint_blocks.{i}.{sai}.weight"
            if third is None:
                out[key] = w.clone()
            else:
                out.setdefault(key, torch.zeros(3 * hidden, w.shape[1]))[third * hidden : (third + 1) * hidden] = w
    return out
