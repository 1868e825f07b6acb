"""Text-embedding cache: each distinct caption encoded once, encoders loaded one at a time.

The maths is the pipeline's ``encode_prompt`` (CLIP-L and CLIP-G penultimate states concatenated,
zero-padded to T5's width, then T5 states appended along the sequence; pooled = both CLIP projections),
written out here because the pipeline needs all three encoders alive at once, which is exactly the
memory peak we avoid. A test checks it against ``StableDiffusion3Pipeline.encode_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd3booth.cache.store import TensorStore, content_key
from sd3booth.models import loaders
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource


@dataclass(frozen=True)
class TextEmbedding:
    prompt_embeds: torch.Tensor  # (77 + T5 tokens, joint_attention_dim)
    pooled: torch.Tensor  # (pooled_projection_dim,)


def t5_numerics(place: Placement) -> str:
    """What decides T5's output numerically: weights format, compute dtype and device kind.

    ``stream`` keeps bf16 weights and computes on the GPU exactly as a resident bf16 T5 does, so the two share
    entries; ``cpu`` computes on the CPU (fp32 when the run is fp32), int8/nf4 change the weights.
    """
    mode = place.memory.t5
    if mode == "none":
        return "none"
    if mode in ("int8", "nf4"):
        return f"{mode}@cuda"
    return f"{str(place.t5_dtype).removeprefix('torch.')}@{place.t5_device.type}"


def text_key(caption: str, src: ModelSource, place: Placement, max_sequence_length: int) -> str:
    """Cache key of one caption's embedding: everything that changes the stored tensor.

    The caption; the identity of the three encoders and three tokenizers; the CLIP compute dtype and device;
    T5's numerics (see :func:`t5_numerics`); the T5 sequence length.
    """
    parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    return content_key(
        kind="text",
        caption=caption,
        components=[src.identity(c) for c in parts],
        clip=f"{str(place.text_dtype).removeprefix('torch.')}@{place.device.type}",
        t5=t5_numerics(place),
        t5_len=max_sequence_length,
    )


def expected_text_shapes(src: ModelSource, max_sequence_length: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a sound entry: 77 CLIP tokens + the T5 tokens, at the transformer's widths."""
    cfg = json.loads((src.root / "transformer" / "config.json").read_text(encoding="utf-8"))
    return {
        "prompt_embeds": (77 + max_sequence_length, cfg["joint_attention_dim"]),
        "pooled": (cfg["pooled_projection_dim"],),
    }


def _clip_embed(tok, enc, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    out = enc(ids.input_ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2].float().cpu(), out[0].float().cpu()


def _t5_embed(tok, enc, captions: list[str], device: torch.device, length: int) -> torch.Tensor:
    ids = tok(
        captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    return enc(ids.input_ids.to(device))[0].float().cpu()


def encode_batch(
    tok: Any, enc: Any, index: int, prompts: list[str], device: torch.device, t5_len: int = 77
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One loaded text encoder's states for a batch of prompts, in fp32 on the CPU. CLIP-L/CLIP-G (``index``
    1 or 2): (penultimate hidden states, pooled projection); T5 (3): (last hidden states at ``t5_len``
    tokens, None). ``device`` is where the encoder runs (``place.t5_device`` for T5). Call under no_grad."""
    if index == 3:
        return _t5_embed(tok, enc, prompts, device, t5_len), None
    return _clip_embed(tok, enc, prompts, device)


def _batches(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def ensure_text_embeddings(
    captions: Iterable[str],
    src: ModelSource,
    place: Placement,
    cache_root: Path,
    max_sequence_length: int,
    log: Callable[[str], None] = print,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> dict[str, str]:
    """Makes sure every caption's embedding is on disk; returns caption -> cache key.

    Only missing captions are encoded. CLIP-L, CLIP-G and T5 are loaded in turn and freed before the
    next one loads; intermediate states wait in CPU memory.
    """
    store = TensorStore(cache_root / "text")
    store.clean_temporaries()  # left by a run killed mid-write
    keys = {c: text_key(c, src, place, max_sequence_length) for c in dict.fromkeys(captions)}
    expected = expected_text_shapes(src, max_sequence_length)
    todo = [c for c, k in keys.items() if not store.usable(k, expected)]
    if not todo:
        return keys
    log(f"encoding {len(todo)} caption(s) ({len(keys) - len(todo)} cached), one text encoder at a time")
    clip_states: list[list[torch.Tensor]] = [[], []]
    pooled: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for index, name in ((1, "CLIP-L"), (2, "CLIP-G")):
            with stage(f"text encoder {name}"):
                tok, enc = loaders.load_text_encoder(src, index, place)
                for chunk in _batches(todo, place.memory.text_batch):
                    h, p = encode_batch(tok, enc, index, chunk, place.device)
                    clip_states[index - 1].append(h)
                    pooled[index - 1].append(p)
                loaders.free(enc)
                del enc
        if place.memory.t5 == "none":
            cfg = json.loads((src.root / "transformer" / "config.json").read_text(encoding="utf-8"))
            t5 = torch.zeros(len(todo), max_sequence_length, cfg["joint_attention_dim"])
        else:
            with stage(f"text encoder T5 ({place.memory.t5})"):
                tok, enc = loaders.load_text_encoder(src, 3, place)
                t5 = torch.cat(
                    [
                        encode_batch(tok, enc, 3, chunk, place.t5_device, max_sequence_length)[0]
                        for chunk in _batches(todo, place.memory.text_batch)
                    ]
                )
                loaders.free(enc)
                del enc
    clip = torch.cat([torch.cat(clip_states[0]), torch.cat(clip_states[1])], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    prompt_embeds = torch.cat([clip, t5], dim=-2)
    pooled_all = torch.cat([torch.cat(pooled[0]), torch.cat(pooled[1])], dim=-1)
    for i, caption in enumerate(todo):
        store.put(
            keys[caption], {"prompt_embeds": prompt_embeds[i], "pooled": pooled_all[i]}, metadata={"caption": caption}
        )
    return keys


def load_text_embeddings(keys: Iterable[str], cache_root: Path, dtype: torch.dtype) -> dict[str, TextEmbedding]:
    """key -> embedding, in CPU memory, in the training dtype."""
    store = TensorStore(cache_root / "text")
    out = {}
    for k in dict.fromkeys(keys):
        t = store.get(k)
        out[k] = TextEmbedding(t["prompt_embeds"].to(dtype), t["pooled"].to(dtype))
    return out
