"""Where an SD3 checkpoint is: a local diffusers folder or a hub id, checked before anything loads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sd3booth.errors import UserError

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}


def quiet_libraries() -> None:
    """Silences the libraries' info chatter and per-load progress bars; our own progress bar stays."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved SD3 checkpoint: a local diffusers folder (hub ids are downloaded to the HF cache first)."""

    root: Path
    name: str
    revision: str | None = None
    variant: str | None = None
    identities: tuple[tuple[str, str], ...] = ()  # single files: component -> hash of the source file's content

    def identity(self, component: str) -> str:
        """A short hash that changes when the component's config or weight files change.

        Hashing file names, sizes and mtimes instead of contents keeps this instant for 10 GB files. A model
        converted from single files keeps the identities of its source files' contents (models.single_file).
        """
        known = dict(self.identities)
        if component in known:
            return known[component]
        h = hashlib.sha256(component.encode())
        folder = self.root / component
        for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
                if p.suffix == ".json" and st.st_size < 1_000_000:
                    h.update(p.read_bytes())
        h.update(f"{self.variant}".encode())
        return h.hexdigest()[:16]


def hub_error_message(what: str, e: BaseException) -> str:
    """One line for a failed hub download: offline, no network, gated, not found, or else."""
    names = {c.__name__ for c in type(e).__mro__}
    name = type(e).__name__
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "OfflineModeIsEnabled" in names:
        return (
            f"could not get {what}: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; unset "
            "HF_HUB_OFFLINE to download it, or pass a local folder"
        )
    if "GatedRepoError" in names:
        return (
            f"could not get {what}: it is gated ({name}); accept its licence on huggingface.co, log in with "
            "`hf auth login` (or set HF_TOKEN), and run again"
        )
    if "RepositoryNotFoundError" in names or "RevisionNotFoundError" in names:
        return (
            f"could not get {what} ({name}): no such repository or revision, or it is private; check the id "
            "and --revision, and log in with `hf auth login` if it is private"
        )
    if names & {"ConnectionError", "ConnectError", "Timeout", "LocalEntryNotFoundError", "gaierror"}:
        return f"could not get {what}: no network ({name}); check your connection, or pass a local folder"
    return (
        f"could not get {what} from the hub ({name}); check the id, your login (`hf auth login`) and "
        "network, or pass a local folder"
    )


def resolve_model(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    *,
    clip_l: str | None = None,
    clip_g: str | None = None,
    t5xxl: str | None = None,
    single_file_config: str | None = None,
) -> ModelSource:
    """Finds the checkpoint folder and checks it is an SD3 diffusers pipeline; UserError otherwise.

    A single ``.safetensors`` file (with or without bundled encoders, plus encoder files given apart) is
    converted once to a diffusers folder (models.single_convert) and keeps its files' content identities.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file() or p.suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
        return _single_file(p, variant, {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}, single_file_config)
    if any((clip_l, clip_g, t5xxl)):
        raise UserError("--clip_l, --clip_g and --t5xxl go with a single-file --pretrained_model_name_or_path")
    if not p.exists():
        if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
            raise UserError(f"model {name_or_path} not found: pass a local SD3 diffusers folder or a hub id")
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=None))
        except Exception as e:  # noqa: BLE001 - any hub failure ends in one line
            raise UserError(hub_error_message(f"model {name_or_path}", e)) from None
    index = p / "model_index.json"
    if not index.is_file():
        raise UserError(f"{p} is not a diffusers pipeline folder (no model_index.json); pass an SD3 checkpoint")
    try:
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except json.JSONDecodeError:
        raise UserError(f"{index} is not valid JSON; the checkpoint is damaged") from None
    if cls not in SD3_PIPELINES:
        raise UserError(f"{p} holds a {cls}, not an SD3 model; pass an SD3 / SD3.5 checkpoint")
    for comp in ("transformer", "vae", "scheduler"):
        if not (p / comp).is_dir():
            raise UserError(f"{p} lacks the '{comp}' folder; the SD3 checkpoint is incomplete")
    check_weight_files(p)
    return ModelSource(root=p, name=name_or_path, revision=revision, variant=variant)


def check_weight_files(root: Path) -> None:
    """UserError naming the first weight file whose safetensors header is unreadable or whose size does not
    match it (an interrupted download or copy). Reads headers only."""
    from sd3booth.models.files import damage

    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        for f in sorted((root / comp).glob("*.safetensors")) if (root / comp).is_dir() else []:
            reason = damage(f)
            if reason:
                raise UserError(
                    f"model file {f} is damaged ({reason}); download or copy the model again (for a hub model, "
                    "delete its folder in the Hugging Face cache first)"
                )


def _configs(src: ModelSource) -> tuple[dict, dict]:
    def read(component: str) -> dict:
        try:
            return json.loads((src.root / component / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    return read("transformer"), read("vae")


def resolution_limits(src: ModelSource) -> tuple[int | None, int | None]:
    """(largest square image in pixels the transformer's position embedding covers or None if unlimited,
    its native size) from the transformer's and VAE's configs: pos_embed_max_size (sample_size) latent patches
    of patch_size latent pixels, each 2^(VAE levels - 1) image pixels."""
    t, v = _configs(src)
    scale = 2 ** (len(v.get("block_out_channels") or [0] * 4) - 1)
    patch = int(t.get("patch_size") or 2)
    largest = t.get("pos_embed_max_size")
    native = t.get("sample_size")
    return (
        int(largest) * patch * scale if largest else None,
        int(native) * scale if native else None,
    )


def check_resolution(src: ModelSource, resolution: int, flag: str = "--resolution") -> None:
    """UserError unless ``resolution`` is a positive multiple of 16 that the model's position embedding covers."""
    if resolution < 16 or resolution % 16:
        raise UserError(f"{flag} {resolution} must be a positive multiple of 16 (VAE factor 8 x patch size 2)")
    largest, _ = resolution_limits(src)
    if largest is not None and resolution > largest:
        raise UserError(
            f"{flag} {resolution} is larger than this model supports ({largest} px: its position embedding "
            f"covers {largest // 16} x {largest // 16} patches); pass {flag} {largest} or less"
        )


def _single_file(path: Path, variant: str | None, encoders: dict[str, str | None], config: str | None) -> ModelSource:
    from sd3booth.models import single_convert, single_file

    if variant:
        raise UserError(f"--variant {variant} applies to diffusers folders, not to the single file {path}")
    files = single_file.inspect_files(path, encoders)
    root = single_convert.materialise(files, single_file.resolve_config_source(config, files.shape))
    identities = dict(files.identities())
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        if (root / tok).is_dir():
            identities[tok] = single_convert.folder_identity(root / tok)
    return ModelSource(root=root, name=str(path.resolve()), identities=tuple(sorted(identities.items())))
