"""Random-weight SD3 pipelines in diffusers layout, built offline.

``tiny`` is for tests and the demo (1.3 M parameters, about 6 MB, CPU-fast), and it is shaped so that it can
learn and so that other tools read it as an SD3:

* attention head dimension 64 and as many blocks as heads (2 heads, width 128). ComfyUI's model detection
  reads an MMDiT's size from tensor shapes alone: depth = width of ``x_embedder`` (``pos_embed.proj``) / 64,
  heads = blocks = depth; its ``context_embedder`` comes from that tensor's shape. Any other head size or
  block count loads wrongly or not at all there.
* width at least one latent patch (2 x 2 x 16 = 64 values). A random transformer is no denoiser, so a LoRA
  trained on it must learn the per-token path from noisy latent to velocity; through ``proj_out`` that needs
  rank 64 over a patch, which a narrower model cannot hold (tests/test_learning.py).
* ``joint_attention_dim`` = the tiny T5's ``d_model`` (the CLIP embeddings, 32 + 32 wide, are zero-padded to
  it) and ``pooled_projection_dim`` = CLIP-L + CLIP-G projection dims (the pipeline concatenates the two
  pooled embeddings).
* a VAE with the real SD3 VAE's structure (4 blocks, 16 latent channels, no quant convs, the real scaling and
  shift factors), narrower, whose posterior log-variance is set strongly negative (:func:`quiet_posterior`):
  with random weights the posterior noise (std 1.5 after scaling) would swamp the image latent (std 0.5).

The true-size architectures have the real layer shapes (../shared/notes/sd3-facts.md §1), so memory and speed
measured on them are the real ones; random weights say nothing about image quality. Tokenizers are built here
from a byte-level vocabulary (CLIP) and a character unigram vocabulary (T5) because the real ones cannot be
downloaded at run time; they tokenise differently from the real ones, but every shape the trainer sees is the
same.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = ("tiny", "sd3-medium", "sd3.5-medium", "sd3.5-large")


@dataclass(frozen=True)
class Arch:
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


_REAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_CLIP_L = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    projection_dim=768,
    hidden_act="quick_gelu",
    vocab_size=49408,
)
_CLIP_G = dict(
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    intermediate_size=5120,
    projection_dim=1280,
    hidden_act="gelu",
    vocab_size=49408,
)
_T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)
_SD3_COMMON = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
)


_TINY_HEADS = 2
POSTERIOR_LOGVAR = -12.0  # posterior std exp(-6) = 0.0025, 0.004 after scaling


def get_arch(name: str) -> Arch:
    """The component configs of one architecture."""
    if name == "tiny":
        return Arch(
            transformer=dict(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=_TINY_HEADS,  # ComfyUI builds as many blocks as heads
                attention_head_dim=64,  # ComfyUI derives heads as width / 64
                num_attention_heads=_TINY_HEADS,
                joint_attention_dim=64,  # the tiny T5's d_model
                caption_projection_dim=_TINY_HEADS * 64,
                pooled_projection_dim=64,  # CLIP-L projection + CLIP-G projection, concatenated
                pos_embed_max_size=32,
            ),
            vae=dict(
                _REAL_VAE, block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64
            ),
            clip_l=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                projection_dim=32,
                hidden_act="quick_gelu",
            ),
            clip_g=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                projection_dim=32,
                hidden_act="gelu",
            ),
            t5=dict(
                d_model=64,
                d_ff=37,
                d_kv=8,
                num_heads=4,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8,
            ),
        )
    if name == "sd3-medium":
        tr = dict(
            _SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192
        )
    elif name == "sd3.5-medium":
        tr = dict(
            _SD3_COMMON,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
    elif name == "sd3.5-large":
        tr = dict(
            _SD3_COMMON,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        )
    else:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    return Arch(transformer=tr, vae=dict(_REAL_VAE), clip_l=dict(_CLIP_L), clip_g=dict(_CLIP_G), t5=dict(_T5_XXL))


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet (the GPT-2 table; transformers v5 no longer exports it).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder: Path) -> Any:
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token (514 tokens)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    tok.save_pretrained(folder)
    return tok


def write_t5_tokenizer(folder: Path) -> Any:
    """A character-level unigram T5 tokenizer (pad 0, eos 1, unk 2), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-_:;()\"/&+"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok = T5TokenizerFast(
        tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )
    tok.save_pretrained(folder)
    return tok


def quiet_posterior(vae: Any, logvar: float = POSTERIOR_LOGVAR) -> Any:
    """Makes a random VAE's posterior nearly deterministic, as a trained one is.

    The encoder's ``conv_out`` gives the mean and the log-variance halves of the latent distribution. Random
    weights make the log-variance about 0 (std 1, 1.5 after the scaling factor), three times the spread of
    the mean over an image (0.5), so latents sampled in training would be mostly noise. The log-variance half
    is set to about ``logvar`` (std exp(logvar / 2)): weights scaled by 0.01, bias ``logvar``.
    """
    import torch

    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].mul_(0.01)
        conv.bias[half:].fill_(logvar)
    return vae


def _save(model: Any, folder: Path) -> None:
    # shards as the published checkpoints have them (T5-XXL: two files of ~5 GB; transformers: diffusers' 10 GB),
    # so what loading passes through host memory (one mapped shard at a time) is the real amount
    model.save_pretrained(
        folder, safe_serialization=True, max_shard_size="5GB" if "text_encoder" in folder.name else "10GB"
    )


def write_random_model(out_dir: str | Path, arch: str = "tiny", seed: int = 0, device: str | None = None) -> Path:
    """Writes a random-weight SD3 pipeline that ``StableDiffusion3Pipeline.from_pretrained`` loads.

    True-size components are initialised on ``device`` (CUDA when available: seconds, not minutes),
    stored in bf16 (the published checkpoints' precision), one component at a time so host memory holds
    at most one of them. ``tiny`` is stored in fp32.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    spec = get_arch(arch)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if arch == "tiny" else torch.bfloat16
    torch.manual_seed(seed)

    clip_tok = write_clip_tokenizer(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer_2")
    t5_tok = write_t5_tokenizer(out / "tokenizer_3")
    special = dict(
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
        max_position_embeddings=77,
    )

    def build(make: Any, folder: str) -> None:
        with torch.device(dev):
            model = make()
        model.to(device="cpu", dtype=dtype)
        _save(model, out / folder)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    clip_l = dict(spec.clip_l)
    clip_l.setdefault("vocab_size", len(clip_tok))
    clip_g = dict(spec.clip_g)
    clip_g.setdefault("vocab_size", len(clip_tok))
    t5 = dict(spec.t5)
    t5.setdefault("vocab_size", len(t5_tok))
    build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_l, **special)), "text_encoder")
    build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_g, **special)), "text_encoder_2")
    build(
        lambda: T5EncoderModel(T5Config(**t5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        "text_encoder_3",
    )
    build(lambda: SD3Transformer2DModel(**spec.transformer), "transformer")
    build(lambda: quiet_posterior(AutoencoderKL(**spec.vae)), "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out / "scheduler")

    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out / "README.md").write_text(
        f"Random-weight SD3 pipeline, arch '{arch}', seed {seed}, written by sd3booth random-model.\n"
        "Good for memory, speed and plumbing tests; says nothing about image quality.\n",
        encoding="utf-8",
    )
    return out
