"""LoRA on the two CLIP text encoders (``--train_text_encoder``), as diffusers' train_dreambooth_lora_sd3.py does.

T5-XXL stays frozen: its part of every prompt embedding is the cached one. The CLIP part is recomputed each
step from token ids (tokenised once per caption at set-up), with the same maths as the text cache
(``cache.text``: penultimate hidden states of both encoders side by side, zero-padded to T5's width, before
T5's tokens; pooled = both projections), so with the LoRA at zero the embedding equals the cached one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sd3booth.cache.text import TextEmbedding
from sd3booth.errors import UserError
from sd3booth.models import loaders
from sd3booth.models.placement import Placement
from sd3booth.models.source import ModelSource

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the diffusers script's text-encoder LoRA targets
NAMES = ("text_encoder", "text_encoder_2")  # file prefixes of CLIP-L and CLIP-G (diffusers, ComfyUI)
CLIP_TOKENS = 77


def add_text_lora(encoder: torch.nn.Module, rank: int, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """A LoRA with alpha = rank (nothing to fold on export) on the attention projections; fp32 parameters."""
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=TARGETS
    )
    inject_adapter_in_model(config, encoder)  # not transformers' add_adapter: it requires peft >= 0.22
    params = [p for p in encoder.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@dataclass
class TextEncoders:
    """CLIP-L and CLIP-G with their LoRAs, and the token ids of every caption of the run."""

    encoders: list[Any]
    device: torch.device
    ids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # caption -> (CLIP-L, CLIP-G)

    @property
    def named(self) -> dict[str, Any]:
        return dict(zip(NAMES, self.encoders))

    def params(self) -> list[torch.nn.Parameter]:
        return [p for enc in self.encoders for p in enc.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        for enc in self.encoders:
            enc.train(mode)

    def clip(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate states (B, 77, 768 + 1280), pooled (B, 768 + 1280)) with the current LoRA."""
        states, pooled = [], []
        for i, enc in enumerate(self.encoders):
            ids = torch.stack([self.ids[c][i] for c in captions]).to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        return torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)

    def embed(self, captions: list[str], cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds, pooled) of a batch: the CLIP part recomputed, T5's tokens taken from ``cached``
        (the batch's cached prompt embeds, (B, 77 + T5 tokens, width))."""
        states, pooled = self.clip(captions)
        states = torch.nn.functional.pad(states, (0, cached.shape[-1] - states.shape[-1]))
        t5 = cached[:, CLIP_TOKENS:].to(states.device)
        return torch.cat([states.to(cached.dtype), t5.to(cached.dtype)], dim=-2), pooled.to(cached.dtype)

    @torch.no_grad()
    def embedding(self, caption: str, cached: TextEmbedding) -> TextEmbedding:
        """One caption's embedding with the current LoRA (validation, generate), on the CPU like the cache's."""
        was_training = self.encoders[0].training
        self.train(False)
        prompt, pooled = self.embed([caption], cached.prompt_embeds[None])
        self.train(was_training)
        return TextEmbedding(prompt[0].cpu(), pooled[0].cpu())

    def state(self) -> dict[str, torch.Tensor]:
        """Raw LoRA weights of both encoders, keys prefixed ``text_encoder.``/``text_encoder_2.``."""
        return {
            f"{name}.{k}": v.detach().cpu().clone()
            for name, enc in self.named.items()
            for k, v in get_peft_model_state_dict(enc).items()
        }

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        for name, enc in self.named.items():
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            expected = set(get_peft_model_state_dict(enc))
            if set(part) != expected:
                raise UserError(
                    f"{source} does not fit this text-encoder LoRA ({name}: {len(expected - set(part))} missing, "
                    f"{len(set(part) - expected)} unexpected keys); resume with the same --text_encoder_rank"
                )
            set_peft_model_state_dict(enc, part)


def token_ids(tokenizers: list[Any], captions: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every caption tokenised once for both CLIP encoders, padded to 77 as the text cache does."""
    out = {}
    for c in dict.fromkeys(captions):
        ids = [
            tok(
                [c], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids[0]
            for tok in tokenizers
        ]
        out[c] = (ids[0], ids[1])
    return out


def load_text_encoders(
    src: ModelSource, place: Placement, captions: Iterable[str], rank: int | None, dropout: float = 0.0
) -> TextEncoders:
    """Both CLIP encoders on the run's device with a LoRA of ``rank`` (None: an existing adapter is loaded
    later), plus the token ids of ``captions``."""
    tokenizers, encoders = [], []
    for index in (1, 2):
        tok, enc = loaders.load_text_encoder(src, index, place)
        if rank is not None:
            add_text_lora(enc, rank, dropout)
        tokenizers.append(tok)
        encoders.append(enc)
    return TextEncoders(encoders, place.device, token_ids(tokenizers, captions))


def lora_from_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Puts a saved text-encoder LoRA (peft names, ``lora_A/lora_B.weight``) onto an encoder: rank from the
    shapes, targets from the keys, alpha = rank (the file's convention)."""
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    modules = sorted({k.split(".lora_")[0] for k in state})
    if len(ranks) != 1 or not modules:
        raise UserError("the text-encoder part of the LoRA file is not a single-rank LoRA; it cannot be applied")
    (rank,) = ranks
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules), encoder)
    result = set_peft_model_state_dict(encoder, state)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"the text-encoder LoRA has keys this encoder lacks: {result.unexpected_keys[:3]}")
