"""The training run: verify settings, prepare caches, train the LoRA, save it.

Data order and per-step randomness are pure functions of (seed, micro-batch index, process rank), so a
run resumed from a checkpoint replays exactly what a straight run would have done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sd3booth import __version__, sample
from sd3booth.adapters import lora
from sd3booth.cache import latents as cache_latents
from sd3booth.cache import text as cache_text
from sd3booth.config import TrainConfig
from sd3booth.errors import UserError
from sd3booth.models import loaders, placement, source, speed
from sd3booth.plan.choose import plan_for_config
from sd3booth.prepare import Prepared, prepare, scan_data
from sd3booth.tracking import MetricsFile, Stages, tracker_config
from sd3booth.train import checkpoint, flow

SETTINGS_FILE = "settings.json"


@dataclass
class RunResult:
    output_dir: Path
    lora_path: Path | None
    steps: int
    final_loss: float | None
    seconds_per_step: float | None
    stages: list[dict[str, Any]] = field(default_factory=list)
    validation_dirs: list[Path] = field(default_factory=list)


# ---- settings checks that fail in seconds, before any model loads ---------------------------------------


def _writable_folder(path: Path, flag: str) -> None:
    """The folder may not exist yet, but nothing on its way may be a file."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {path}: {p} is a file, not a folder; choose another path")
            return


def verify(cfg: TrainConfig) -> None:
    """Every check of the settings and inputs that needs no model weights; raises UserError, writes nothing.

    It runs before anything is created or changed, so a mistake costs seconds and no saved file.
    """
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant)
    if cfg.instance_data_dir and not Path(cfg.instance_data_dir).is_dir():
        raise UserError(f"--instance_data_dir {cfg.instance_data_dir} is not a folder; pass the folder of your photos")
    out = Path(cfg.output_dir)
    _writable_folder(out, "--output_dir")
    _writable_folder(cfg.cache_path, "--cache_dir")
    if cfg.with_prior_preservation:
        _writable_folder(Path(cfg.class_data_dir or ""), "--class_data_dir")
    if cfg.report_to in ("tensorboard", "wandb"):
        import importlib.util

        if importlib.util.find_spec(cfg.report_to) is None:
            raise UserError(
                f"--report_to {cfg.report_to} needs the '{cfg.report_to}' package; pip install "
                f"{cfg.report_to}, or pass --report_to none (metrics.jsonl is always written)"
            )
    settings = out / SETTINGS_FILE
    if settings.is_file() and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} holds another run ({SETTINGS_FILE}); continue it with --resume_from_checkpoint "
            "latest, replace it with --overwrite_output_dir (the cache is kept), or choose another folder"
        )
    if cfg.resume_from_checkpoint:
        checkpoint.find(out / "checkpoints", cfg.resume_from_checkpoint)
    if Path(cfg.data_dir or "").is_dir():
        scan_data(cfg, log=lambda m: None)  # data errors now, not after the text encoders ran
    # LoRA targets against the architecture, built on the meta device (no memory, no weights)
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        skeleton = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(src.root / "transformer"))
    lora.resolve_targets(skeleton, cfg.target_layers, cfg.target_blocks)


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {
        "sd3booth": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def write_settings(cfg: TrainConfig, out: Path) -> None:
    record = {"settings": cfg.to_dict(), "versions": _versions(), "written": datetime.now(UTC).isoformat()}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# ---- data order -------------------------------------------------------------------------------------------


def _perm(n: int, seed: int, epoch: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % 2**63)
    return torch.randperm(n, generator=g).tolist()


class DataOrder:
    """Which examples form micro-batch m on process `rank`: a fresh permutation per epoch, last batch dropped."""

    def __init__(self, n_items: int, n_class: int, batch: int, processes: int, seed: int) -> None:
        self.n_items, self.n_class, self.batch, self.processes, self.seed = n_items, n_class, batch, processes, seed
        self.batches_per_epoch = n_items // (batch * processes)

    def epoch_of(self, m: int) -> int:
        return m // self.batches_per_epoch

    def instance_items(self, m: int, rank: int) -> list[int]:
        perm = _perm(self.n_items, self.seed, self.epoch_of(m), 0)
        start = ((m % self.batches_per_epoch) * self.processes + rank) * self.batch
        return perm[start : start + self.batch]

    def class_items(self, m: int, rank: int) -> list[int]:
        out = []
        for i in range(self.batch):
            pos = (m * self.processes + rank) * self.batch + i
            out.append(_perm(self.n_class, self.seed, pos // self.n_class, 1)[pos % self.n_class])
        return out


def step_seed(seed: int, m: int, rank: int) -> int:
    return (seed * 2_654_435_761 + m * 1_000 + rank + 1) % 2**63


# ---- the run ----------------------------------------------------------------------------------------------


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name = cfg.optimizer_name
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if name == "adamw":
        # fused: one kernel for all LoRA tensors instead of a dozen per tensor (CUDA only)
        return torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=betas,
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
            fused=bool(params) and params[0].is_cuda,
        )
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(
            params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
        )
    from prodigyopt import Prodigy

    return Prodigy(
        params,
        lr=cfg.learning_rate,
        betas=betas,
        beta3=cfg.prodigy_beta3,
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        decouple=cfg.prodigy_decouple,
        use_bias_correction=cfg.prodigy_use_bias_correction,
        safeguard_warmup=cfg.prodigy_safeguard_warmup,
    )


def _crop(z: torch.Tensor, size: int, center: bool) -> torch.Tensor:
    """A size x size window of a (C, H, W) latent: centred, or at a random offset (global RNG)."""
    h, w = z.shape[-2:]
    if center:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top = int(torch.randint(0, h - size + 1, ()).item()) if h > size else 0
        left = int(torch.randint(0, w - size + 1, ()).item()) if w > size else 0
    return z[:, top : top + size, left : left + size]


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> RunResult:
    """Runs every stage of ``sd3booth train``; returns what it produced."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    source.quiet_libraries()
    verify(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    resume_path = checkpoint.find(ckpt_root, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    if cfg.resume_from_checkpoint and resume_path is None:
        log(f"no checkpoint under {ckpt_root}; starting a new run")

    seed = cfg.seed if cfg.seed is not None else 0
    mp = cfg.mixed_precision or placement.default_mixed_precision(
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    accelerator = Accelerator(
        mixed_precision=mp,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    main = accelerator.is_main_process
    say = log if main else (lambda _msg: None)
    device = accelerator.device
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant)
    memory_plan, budget = plan_for_config(cfg, src.root, total)
    if device.type == "cuda":
        say(f"memory plan for {budget:.1f} GiB ({'--max_vram' if cfg.max_vram else 'default budget'}):")
        say(memory_plan.describe())
    place = placement.plan_placement(device, mp, cfg.t5_precision, memory_plan)
    if cfg.allow_tf32 and place.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    stages = Stages(place.device)
    profiler = speed.StepProfiler(os.environ.get("SD3BOOTH_PROFILE"), place.device, out / "profile.json", say)
    if main:
        (out / "plan.json").write_text(json.dumps({"budget_gib": budget, **memory_plan.to_dict()}, indent=2) + "\n")

    # 1. caches (main process first; the others then find everything cached)
    with accelerator.main_process_first():
        prep: Prepared = prepare(cfg, place, say, stages.stage if main else (lambda n: contextlib.nullcontext()))
    if main:  # the caches are complete: only now does this folder become this run's
        if cfg.overwrite_output_dir and not resume_path:
            for stale in ("checkpoints", "validation", "metrics.jsonl"):  # the old run's; the cache stays
                p = out / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        write_settings(cfg, out)
    text = cache_text.load_text_embeddings(prep.text_keys.values(), cfg.cache_path, place.weight_dtype)
    lat = cache_latents.load_latents(list(prep.latent_keys.values()), cfg.cache_path)

    # 2. model + LoRA + optimizer
    torch.manual_seed(seed)
    with stages.stage("load transformer"):
        transformer = loaders.load_transformer(prep.src, place)
        targets = lora.resolve_targets(transformer, cfg.target_layers, cfg.target_blocks)
        params = lora.add_lora(transformer, cfg.rank, cfg.alpha, cfg.lora_dropout, targets)
        loaders.apply_fp8_storage(transformer, place)
        swapper = loaders.attach_memory_savers(transformer, place)
    compiled = None
    if memory_plan.compiled:  # the plan decided (on by default on CUDA with bf16 blocks, see plan.py)
        compiled = speed.CompiledBlocks(transformer.transformer_blocks)
        say(f"compiling {len(compiled.blocks)} transformer blocks (the first steps include compilation)")
    items = [i for i in range(len(prep.instances)) for _ in range(cfg.repeats)]
    order = DataOrder(len(items), len(prep.classes), cfg.train_batch_size, accelerator.num_processes, seed)
    if order.batches_per_epoch == 0:
        raise UserError(
            f"{len(items)} image(s) x repeats is fewer than one batch per process; lower --train_batch_size"
        )
    accum = cfg.gradient_accumulation_steps
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(order.batches_per_epoch / accum)
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= accum * cfg.train_batch_size * accelerator.num_processes
    optimizer = _make_optimizer(cfg, params)
    for g in optimizer.param_groups:
        g["lr"] = lr
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    scheduler = loaders.load_scheduler(prep.src)
    train_sigmas = scheduler.sigmas.to(place.device)
    train_timesteps = scheduler.timesteps.to(place.device)
    num_train_timesteps = scheduler.config.num_train_timesteps

    # 3. resume
    start = 0
    if resume_path:
        start, state, trainer_state, _meta = checkpoint.load(resume_path)
        lora.load_lora_state(accelerator.unwrap_model(transformer), state, str(resume_path))
        for p in params:
            p.data = p.data.float()
        optimizer.optimizer.load_state_dict(trainer_state["optimizer"])
        lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        if accelerator.scaler is not None and trainer_state.get("scaler"):
            accelerator.scaler.load_state_dict(trainer_state["scaler"])
        say(f"resumed from {resume_path} at step {start}")
    if main:
        accelerator.init_trackers("sd3booth", config=tracker_config(cfg.to_dict()))
    metrics = MetricsFile(out / "metrics.jsonl", start) if main else None

    latent_size = cfg.resolution // 8
    n_inst = cfg.train_batch_size

    pin = place.device.type == "cuda"

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        """Pinned + non_blocking: a copy from pageable memory would first wait for the GPU to drain its queue,
        a host sync per copy that stops the CPU from queueing the next step's kernels ahead of the GPU."""
        return (t.pin_memory() if pin else t).to(place.device, non_blocking=pin)

    def make_batch(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 latents, prompt embeds, pooled) of micro-batch m; seeds the global RNG for this micro-batch."""
        torch.manual_seed(step_seed(seed, m, accelerator.process_index))
        exs = [prep.instances[items[i]] for i in order.instance_items(m, accelerator.process_index)]
        if cfg.with_prior_preservation:
            exs += [prep.classes[i] for i in order.class_items(m, accelerator.process_index)]
        zs, pes, pps = [], [], []
        for ex in exs:
            flip = cfg.random_flip and bool(torch.rand(()) < 0.5)
            mean, std = lat[prep.latent_keys[(ex.uid, flip)]]
            z = _crop(mean + std * torch.randn_like(mean), latent_size, cfg.center_crop)
            zs.append((z - prep.shift_factor) * prep.scaling_factor)
            emb = text[prep.text_keys[ex.caption]]
            pes.append(emb.prompt_embeds)
            pps.append(emb.pooled)
        return to_dev(torch.stack(zs)), to_dev(torch.stack(pes)), to_dev(torch.stack(pps))

    def micro_loss(m: int) -> torch.Tensor:
        x0, prompt_embeds, pooled = make_batch(m)
        idx = to_dev(
            flow.sample_indices(
                cfg.weighting_scheme, x0.shape[0], cfg.logit_mean, cfg.logit_std, cfg.mode_scale, num_train_timesteps
            )
        )
        sigma, timesteps = flow.sigmas_and_timesteps(idx, train_sigmas, train_timesteps, x0.ndim)
        noise = torch.randn_like(x0)
        x_t = flow.noisy_latents(x0, noise, sigma)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=place.device.type == "cuda")
        with accelerator.autocast(), offload if place.activation_offload else contextlib.nullcontext():
            out_ = transformer(
                hidden_states=x_t.to(place.weight_dtype),
                timestep=timesteps,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        pred = flow.prediction(out_.float(), x_t, sigma, bool(cfg.precondition_outputs))
        tgt = flow.target(x0, noise, bool(cfg.precondition_outputs))
        per_sample = flow.per_sample_loss(pred, tgt, flow.loss_weighting(cfg.weighting_scheme, sigma))
        return flow.dreambooth_loss(per_sample, n_inst, cfg.prior_loss_weight)

    def attention() -> contextlib.AbstractContextManager:
        return speed.attention_context(place.device, cfg.attention_backend)

    vae_holder: dict[str, Any] = {}
    validation_dirs: list[Path] = []

    def validate(step: int) -> None:
        if not (main and prep.validation_key):
            return
        with stages.stage(f"validation step {step}"):
            vae = vae_holder.get("vae") or loaders.load_vae(prep.src, place)
            vae.to(place.device)
            net = accelerator.unwrap_model(transformer)
            net.eval()
            pipe = sample.make_pipeline(net, vae, loaders.load_scheduler(prep.src))
            autocast = place.weight_dtype if place.weight_dtype != torch.float32 else None
            with compiled.eager() if compiled else contextlib.nullcontext(), attention():
                images = sample.generate(
                    pipe,
                    text[prep.validation_key],
                    text[prep.negative_key],
                    cfg.num_validation_images,
                    seed,
                    cfg.resolution,
                    cfg.num_inference_steps,
                    cfg.guidance_scale,
                    place.device,
                    autocast_dtype=autocast,
                )
            folder = out / "validation" / f"step-{step}"
            sample.save_images(images, folder)
            validation_dirs.append(folder)
            net.train()
            vae_holder["vae"] = vae.to("cpu")  # kept on the CPU between validations, off the GPU
            del pipe
            loaders.free()
        tb = _tensorboard(accelerator)
        if tb is not None:
            import numpy as np

            tb.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")

    def completed_epochs(step: int) -> int:
        return (step * accum) // order.batches_per_epoch

    # 4. the loop
    say(
        f"training {max_steps} steps: {len(prep.instances)} images x {cfg.repeats} repeats, batch "
        f"{cfg.train_batch_size} x {accum} accumulation x {accelerator.num_processes} process(es), "
        f"{sum(p.numel() for p in params):,} LoRA parameters, {place.mixed_precision} mixed precision"
    )
    transformer.train()
    bar = tqdm(total=max_steps, initial=start, desc="train", unit="step", disable=not main, dynamic_ncols=True)
    loss_acc, loss_n, last_loss = torch.zeros((), device=place.device), 0, None
    t_log, step = time.perf_counter(), start
    step_times: list[float] = []
    with stages.stage("training"), attention():
        while step < max_steps:
            for micro in range(accum):
                m = step * accum + micro
                sync = micro == accum - 1 or accelerator.num_processes == 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(transformer):
                    loss = micro_loss(m)
                    accelerator.backward(loss / accum)
                loss_acc += loss.detach() / accum
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_n += 1
            bar.update(1)
            profiler.step(step - start)
            # a compiled run logs its first step alone: its time is mostly compilation
            if step % cfg.logging_steps == 0 or step == max_steps or (compiled and step == start + 1):
                last_loss = (accelerator.reduce(loss_acc, "mean") / loss_n).item()  # the only host sync
                dt = (time.perf_counter() - t_log) / loss_n
                step_times.append(dt)
                peak = loaders.peak_memory_gib(place.device)
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "s_per_step": dt,
                    "peak_gpu_gib": peak,
                    "epoch": completed_epochs(step),
                }
                bar.set_postfix(loss=f"{last_loss:.4f}", peak=f"{peak:.2f}GiB" if peak else "-", refresh=False)
                if main:
                    metrics.write(record)
                    accelerator.log(
                        {"loss": last_loss, "lr": record["lr"], "s_per_step": dt, "peak_gpu_gib": peak}, step=step
                    )
                loss_acc.zero_()
                loss_n, t_log = 0, time.perf_counter()
            t_pause = time.perf_counter()  # checkpoints and validation do not count as step time
            if step % cfg.checkpointing_steps == 0 and main:
                _save_checkpoint(cfg, accelerator, transformer, optimizer, lr_scheduler, ckpt_root, step, out)
            due = (
                (step % cfg.validation_steps == 0)
                if cfg.validation_steps
                else (
                    completed_epochs(step) > completed_epochs(step - 1)
                    and completed_epochs(step) % cfg.validation_epochs == 0
                )
            )
            if due and step < max_steps:
                validate(step)
            t_log += time.perf_counter() - t_pause
    bar.close()
    if swapper is not None:
        st = swapper.stats
        say(
            f"block swap: {st.bytes_copied / 2**30:.1f} GiB copied, {st.prefetched} blocks prefetched, "
            f"{st.synchronous} fetched on demand"
        )

    # 5. artefacts
    accelerator.wait_for_everyone()
    lora_path = None
    if main:
        net = accelerator.unwrap_model(transformer)
        lora_path = lora.save_lora(net, out, cfg.rank, cfg.alpha)
        if start < max_steps or not any(d.name == f"step-{step}" for d in validation_dirs):
            validate(step)
        stages.save(out / "stages.json")
    accelerator.end_training()
    median = sorted(step_times)[len(step_times) // 2] if step_times else None
    return RunResult(out, lora_path, step, last_loss, median, stages.records, validation_dirs)


def _tensorboard(accelerator: Any) -> Any:
    for t in getattr(accelerator, "trackers", []):
        if t.name == "tensorboard":
            return t.writer
    return None


def _save_checkpoint(
    cfg: TrainConfig,
    accelerator: Any,
    transformer: Any,
    optimizer: Any,
    lr_scheduler: Any,
    root: Path,
    step: int,
    out: Path,
) -> None:
    net = accelerator.unwrap_model(transformer)
    state = {
        "optimizer": optimizer.optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".ckpt-lora-") as tmp:
        exported = lora.save_lora(net, Path(tmp), cfg.rank, cfg.alpha)
        checkpoint.save(
            root,
            step,
            lora.lora_state(net),
            state,
            {"settings": cfg.to_dict()},
            extra_files={lora.LORA_FILE: exported},
            total_limit=cfg.checkpoints_total_limit,
        )
