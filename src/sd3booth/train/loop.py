"""The training run, top to bottom: set up (verify, place, cache, model, optimizer, resume), loop, artefacts.

Data order and per-step randomness are pure functions of (seed, micro-batch index, process rank), so a
run resumed from a checkpoint replays exactly what a straight run would have done. The pieces live beside
this file: ``batch`` (a micro-batch from the caches), ``loss`` (the flow-matching loss), ``optim``,
``validate``, ``checkpoint``, ``verify`` and ``settings``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd3booth.adapters import build, init_lora, lora
from sd3booth.adapters import text_encoder as clip_lora
from sd3booth.cache import latents as cache_latents
from sd3booth.cache import masks as cache_masks
from sd3booth.cache import text as cache_text
from sd3booth.config import TrainConfig
from sd3booth.errors import UserError
from sd3booth.models import loaders, memory, placement, source, speed
from sd3booth.prepare import Prepared, batch_shape_count, prepare, train_size
from sd3booth.report import REPORT_FILE, write_report_safely
from sd3booth.tracking import MetricsFile, Stages, tracker_config
from sd3booth.train import artefacts, checkpoint, methods, publish, resume
from sd3booth.train.artefacts import RunResult  # noqa: F401 - callers import it from here
from sd3booth.train.batch import BatchSource, make_batch, to_device
from sd3booth.train.conditioning import conditioning
from sd3booth.train.ema import EMA
from sd3booth.train.guard import StepGuard, out_of_memory_message
from sd3booth.train.loss import FlowSettings, flow_matching_loss
from sd3booth.train.optim import make_lr_scheduler, schedule_name
from sd3booth.train.order import DataOrder
from sd3booth.train.settings import SETTINGS_FILE, RunRecord, portable_settings
from sd3booth.train.validate import Validator
from sd3booth.train.verify import verify


@dataclass
class Run:
    """What the loop works with, built by :func:`setup`."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    place: placement.Placement
    stages: Stages
    say: Callable[[str], None]
    prep: Prepared | None = None
    batches: BatchSource | None = None
    transformer: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    swapper: Any = None
    compiled: speed.CompiledBlocks | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    sigmas: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    max_steps: int = 0
    start: int = 0
    resume_path: Path | None = None
    validator: Validator | None = None
    guard: StepGuard | None = None
    record: RunRecord | None = None  # settings.json, written after each save (main process only)
    spec: build.AdapterSpec | None = None
    text: clip_lora.TextEncoders | None = None  # --train_text_encoder: CLIP-L and CLIP-G with their LoRA
    ema: EMA | None = None
    class_embedding: Any = None  # --prior_preservation_mode base_model: the cached class-prompt embedding
    validation_cached: tuple[Any, Any] | None = None  # ([(prompt, cached embedding)], negative) of validation

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def completed_epochs(self, step: int) -> int:
        return (step * self.cfg.gradient_accumulation_steps) // self.batches.order.batches_per_epoch


# ---- setup ------------------------------------------------------------------------------------------------


def _open(cfg: TrainConfig, log: Callable[[str], None]) -> Run:
    """Verify, then the accelerator, the placement (one decision, see models.placement) and the memory plan."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    source.quiet_libraries()
    verify(cfg)
    out = Path(cfg.output_dir)
    checkpoint.open_output(out)  # created, without the temporaries of a write killed last time
    (out / "oom.json").unlink(missing_ok=True)  # an earlier run's out-of-memory record (see train)
    info = placement.detect_device()
    src = source.resolve_model(cfg.pretrained_model_name_or_path or "", cfg.revision, cfg.variant, **cfg.model_files)
    shapes = batch_shape_count(cfg, src)  # the memory plan keeps headroom for each batch shape beyond the first
    place = placement.place_run(cfg, src.root, info, train_size=train_size(cfg, src), shapes=shapes)
    accelerator = Accelerator(
        mixed_precision=place.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    say = log if accelerator.is_main_process else (lambda _msg: None)
    if place.device.type == "cuda":
        which = "--max_vram" if cfg.max_vram else "default budget: free on the card at start, less 0.5"
        say(f"memory plan for {place.budget_gib:.1f} GiB of {info.name}, whole process ({which}):")
        say(place.memory.describe())
        if memory.ensure_expandable_segments():
            say("allocator: expandable segments switched on (CUDA had started before PYTORCH_CUDA_ALLOC_CONF)")
        if place.memory.allocator_cap_gib:
            memory.cap_allocator(place.device, place.memory.allocator_cap_gib)
        if cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        plan = {"budget_gib": place.budget_gib, "device": info.name, "measured_overhead_gib": info.overhead_gib,
                "allocator_settings": memory.allocator_settings(), **place.memory.to_dict()}  # fmt: skip
        (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return Run(cfg, out, accelerator, place, Stages(place.device), say)


def _caches(run: Run) -> None:
    """Every caching stage (main process first; the others then find everything cached), then the folder
    becomes this run's: only now are old outputs replaced (settings.json: after each save, see train/settings)."""
    cfg, out = run.cfg, run.out
    noop = lambda name: contextlib.nullcontext()  # noqa: E731
    with run.accelerator.main_process_first():
        prep = prepare(cfg, run.place, run.say, run.stages.stage if run.main else noop)
    if run.main:
        if cfg.overwrite_output_dir and not run.resume_path:
            for stale in ("checkpoints", "validation", "metrics.jsonl", SETTINGS_FILE, REPORT_FILE, *publish.RUN_FILES):
                p = out / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        run.record = RunRecord.begin(cfg, out, prep.instances, run.resume_path)
    text = cache_text.load_text_embeddings(prep.text_keys.values(), cfg.cache_path, run.place.weight_dtype)
    lat = cache_latents.load_latents(list(prep.latent_keys.values()), cfg.cache_path)
    seed = cfg.seed if cfg.seed is not None else 0
    order = DataOrder([it.size for it in prep.items], cfg.train_batch_size, run.accelerator.num_processes, seed)
    run.prep, masks = prep, cache_masks.load_masks(list(prep.mask_keys.values()), cfg.cache_path)
    run.batches = BatchSource(  # every item is in a batch: scan_data refuses fewer images than one batch
        prep.instances, prep.classes, prep.items, order, lat, prep.latent_keys, text, prep.text_keys,
        cfg.center_crop, cfg.random_flip, prep.shift_factor, prep.scaling_factor, seed,
        tuple(c.prior_loss_weight for c in prep.concepts), prep.negative_key, cfg.caption_dropout_rate, masks,
        prep.mask_keys,
    )  # fmt: skip
    if cfg.base_model_prior:
        run.class_embedding = text[prep.text_keys[cfg.class_prompt or ""]]
    if run.main and prep.validation_keys:
        prompts = [text[k] for k in prep.validation_keys]
        run.validation_cached = (list(zip(prep.validation_prompts, prompts)), text[prep.negative_key])
        size = (cfg.width or cfg.resolution, cfg.height or cfg.resolution)
        run.validator = Validator(
            prep.src, run.place, out, prompts, text[prep.negative_key],
            cfg.num_validation_images, seed, size, cfg.num_inference_steps, cfg.guidance_scale, cfg.attention_backend,
        )  # fmt: skip


def _model(run: Run) -> None:
    """The frozen transformer as the plan says, with the LoRA, memory savers and compiled blocks."""
    cfg, place = run.cfg, run.place
    torch.manual_seed(run.batches.seed)
    with run.stages.stage("load transformer"):
        transformer = loaders.load_transformer(run.prep.src, place)
        init = init_lora.read_init(cfg.init_lora) if cfg.init_lora else None
        layers = sorted(init) if init is not None and not cfg.lora_layers else cfg.target_layers  # the file's layers
        targets = lora.resolve_targets(transformer, layers, cfg.target_blocks)
        run.spec = build.AdapterSpec(cfg.adapter_type, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.lokr_factor)
        run.params = build.add_adapter(transformer, run.spec, targets)
        if init is not None:  # a resumed run overwrites these with the checkpoint's weights
            run.say(init_lora.apply_init(transformer, init, cfg.rank, cfg.alpha, run.batches.seed))
        loaders.apply_fp8_storage(transformer, place)
        if cfg.base_compute == "fp8":
            run.say(loaders.apply_fp8_compute(transformer))
        run.swapper = loaders.attach_memory_savers(transformer, place)
    if place.memory.compiled:  # the plan decided (on by default on CUDA with bf16 blocks, see plan/choose.py)
        shapes = len(run.batches.order.shapes())  # (bucket, batch length) pairs: one compilation each, or dynamic
        mode = "reduce-overhead" if place.memory.cuda_graphs else None  # CUDA graphs where the plan allows them
        run.compiled = speed.CompiledBlocks(transformer.transformer_blocks, mode, shapes=shapes)
        run.say(run.compiled.describe())
    scheduler = loaders.load_scheduler(run.prep.src)
    run.sigmas = scheduler.sigmas.to(place.device)
    run.timesteps = scheduler.timesteps.to(place.device)
    run.transformer = transformer
    methods.load_text_encoders(run)


def _optimization(run: Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    accum = cfg.gradient_accumulation_steps
    run.max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(run.batches.order.batches_per_epoch / accum)
    lr = cfg.learning_rate * (accum * cfg.train_batch_size * acc.num_processes if cfg.scale_lr else 1)
    optimizer = methods.optimizer(run, lr)
    run.lr_scheduler = make_lr_scheduler(
        schedule_name(cfg.optimizer_name, cfg.lr_scheduler), optimizer, cfg.lr_warmup_steps, run.max_steps,
        cfg.lr_num_cycles, cfg.lr_power,
    )  # fmt: skip
    run.transformer, run.optimizer = acc.prepare(run.transformer, optimizer)
    run.guard = StepGuard(cfg.max_bad_steps, run.say)
    methods.attach(run)


def _resume(run: Run) -> None:
    if not run.resume_path:
        return
    base_lrs = list(run.lr_scheduler.base_lrs)  # this run's rate, before the checkpoint's replaces it
    start, state, trainer_state, meta = checkpoint.load(run.resume_path)
    if meta.get("data_order", run.batches.order.fingerprint) != run.batches.order.fingerprint:
        run.say("warning: the images or their buckets changed since this checkpoint; the data order differs from it")
    artefacts.restore(run, state, str(run.resume_path))
    run.optimizer.optimizer.load_state_dict(trainer_state["optimizer"])
    methods.restore_ema(run, trainer_state)
    run.lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
    resume.apply_learning_rate(run.optimizer.optimizer, run.lr_scheduler, base_lrs)  # a new rate/schedule applies
    if run.accelerator.scaler is not None and trainer_state.get("scaler"):
        run.accelerator.scaler.load_state_dict(trainer_state["scaler"])
    run.start = start
    run.say(f"resumed from {run.resume_path} at step {start}")


def setup(run: Run) -> None:
    """Everything before the first step after :func:`_open`, in data-flow order."""
    cfg = run.cfg
    ckpt_root = run.out / "checkpoints"
    run.resume_path = checkpoint.find(ckpt_root, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    if cfg.resume_from_checkpoint and run.resume_path is None:
        run.say(f"no checkpoint under {ckpt_root}; starting a new run")
    _caches(run)
    _model(run)
    _optimization(run)
    _resume(run)
    if run.main:
        run.accelerator.init_trackers("sd3booth", config=tracker_config(portable_settings(cfg)))


# ---- one step ---------------------------------------------------------------------------------------------


def micro_step_loss(run: Run, m: int) -> torch.Tensor:
    """The loss of micro-batch m: its batch from the caches, then the flow-matching loss through the model."""
    cfg, place, dev = run.cfg, run.place, run.place.device
    if run.compiled is not None:  # a new iteration for CUDA graph trees (outputs of the last one are done)
        run.compiled.step_begin()
    b = make_batch(run.batches, m, run.accelerator.process_index)
    x0, prompt_embeds, pooled = (to_device(t, dev) for t in (b.x0, b.prompt_embeds, b.pooled))
    mask = to_device(b.mask, dev) if b.mask is not None else None
    offload = torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")
    prompt_embeds, pooled, base_prior = conditioning(run, m, x0.shape[0], prompt_embeds, pooled)

    def model(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with run.accelerator.autocast(), offload if place.memory.activation_offload else contextlib.nullcontext():
            return run.transformer(
                hidden_states=x_t.to(place.weight_dtype),
                timestep=timesteps,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]

    flow = FlowSettings(
        cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, bool(cfg.precondition_outputs),
        cfg.prior_loss_weight, cfg.loss_type, cfg.huber_c,
    )  # fmt: skip
    return flow_matching_loss(
        model, x0, b.n_instance, run.sigmas, run.timesteps, flow, base_prior, mask, b.prior_weight
    )


def optimizer_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss (on device)."""
    accum, acc = run.cfg.gradient_accumulation_steps, run.accelerator
    total = torch.zeros((), device=run.place.device)
    for micro in range(accum):
        sync = micro == accum - 1 or acc.num_processes == 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.transformer):
            loss = micro_step_loss(run, step * accum + micro)
            acc.backward(loss / accum)
        total += loss.detach() / accum
    if run.cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if acc.scaler is not None:  # fp16: the scaler skips steps whose gradients overflowed (a host sync anyway)
        run.guard.after_step(step + 1, acc.optimizer_step_was_skipped, acc.scaler.get_scale())
    if run.ema is not None:
        run.ema.update()
    return total


# ---- the loop ---------------------------------------------------------------------------------------------


def _log_step(run: Run, metrics: MetricsFile | None, step: int, loss: float, dt: float, bar: Any) -> None:
    peak = loaders.peak_memory_gib(run.place.device)
    lr = run.lr_scheduler.get_last_lr()[0]
    record = {"step": step, "loss": loss, "lr": lr, "s_per_step": dt, "peak_gpu_gib": peak}
    bar.set_postfix(loss=f"{loss:.4f}", peak=f"{peak:.2f}GiB" if peak else "-", refresh=False)
    # the first compiled step, logged alone: whether its compilation came from the cache of an earlier run
    first = {"compile_cache": speed.compile_cache_counts()} if run.compiled and step == run.start + 1 else {}
    if metrics is not None:
        metrics.write({**record, "epoch": run.completed_epochs(step), **first})
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)


def _checkpoint(run: Run, step: int) -> None:
    cfg = run.cfg
    checkpoint.save_training_state(
        run.out / "checkpoints", step, artefacts.raw_state(run), functools.partial(artefacts.export, run),
        run.optimizer.optimizer, run.lr_scheduler, run.accelerator.scaler,
        {"settings": portable_settings(cfg), "data_order": run.batches.order.fingerprint}, cfg.checkpoints_total_limit,
        run.out, {"ema": run.ema.state_dict()} if run.ema else None,
    )  # fmt: skip
    run.record.save(step)


def loop(run: Run) -> tuple[int, float | None, list[float]]:
    """Steps from run.start to run.max_steps; returns (last step, last logged loss, s/step of each log window)."""
    from tqdm.auto import tqdm

    cfg, start = run.cfg, run.start
    profile = os.environ.get("SD3BOOTH_PROFILE")
    profiler = speed.StepProfiler(profile, run.place.device, run.out / "profile.json", run.say)
    metrics = MetricsFile(run.out / "metrics.jsonl", start) if run.main else None
    run.say(
        f"training {run.max_steps} steps: {len(run.batches.instances)} images x {cfg.repeats} repeats, batch "
        f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
        f"{run.accelerator.num_processes} process(es), {sum(p.numel() for p in run.params):,} LoRA parameters, "
        f"{run.place.mixed_precision} mixed precision"
    )
    run.transformer.train()
    if run.text is not None:
        run.text.train()
    bar = tqdm(total=run.max_steps, initial=start, desc="train", unit="step", disable=not run.main, dynamic_ncols=True)
    loss_sum, n, last_loss, step_times = torch.zeros((), device=run.place.device), 0, None, []
    t_log, step = time.perf_counter(), start
    # every block variant is compiled by the end of step 1, every batch shape (bucket) within an epoch
    compiled_by = (start + 1, start + math.ceil(run.batches.order.batches_per_epoch / cfg.gradient_accumulation_steps))
    with run.stages.stage("training"), speed.attention_context(run.place.device, cfg.attention_backend):
        while step < run.max_steps:
            loss_sum += optimizer_step(run, step)
            step, n = step + 1, n + 1
            bar.update(1)
            profiler.step(step - start)
            if run.compiled and step in compiled_by:  # no compilation after these steps: free the workers
                run.compiled.done_compiling()
            # a compiled run logs its first step alone (compilation), with CUDA graphs the second too (recording)
            first = run.compiled and (step == start + 1 or (run.compiled.cuda_graphs and step == start + 2))
            if step % cfg.logging_steps == 0 or step == run.max_steps or first:
                last_loss = (run.accelerator.reduce(loss_sum, "mean") / n).item()  # the only host sync
                run.guard.check_loss(step, last_loss, run.accelerator.scaler is not None)
                step_times.append((time.perf_counter() - t_log) / n)
                _log_step(run, metrics, step, last_loss, step_times[-1], bar)
                loss_sum.zero_()
                n, t_log = 0, time.perf_counter()
            t_pause = time.perf_counter()  # checkpoints and validation do not count as step time
            if step % cfg.checkpointing_steps == 0 and run.main:
                run.guard.check_loss(step, float(loss_sum.sum()), run.accelerator.scaler is not None)
                _checkpoint(run, step)
            if methods.validation_due(run, step) and step < run.max_steps:
                methods.validate(run, step)
            t_log += time.perf_counter() - t_pause
    bar.close()
    return step, last_loss, step_times


# ---- artefacts --------------------------------------------------------------------------------------------


def finish(run: Run, step: int, last_loss: float | None, step_times: list[float]) -> RunResult:
    """The LoRA file, a last validation, stages.json."""
    if run.swapper is not None:
        st = run.swapper.stats
        sw = run.swapper
        run.say(
            f"block swap: {sw.resident_bytes_saved() / 2**30:.2f} GiB of host copies ({sw.from_file} of "
            f"{len(sw.swapped)} blocks read straight from the file), {st.bytes_copied / 2**30:.1f} GiB copied, "
            f"{st.prefetched} blocks prefetched, {st.synchronous} fetched on demand"
        )
    run.accelerator.wait_for_everyone()
    lora_path = None
    if run.main:
        lora_path = publish.finalize(run.cfg, artefacts.export(run, run.out), run.prep.src.root, step)
        run.record.save(step, finished=True)
        folders = run.validator.folders if run.validator else []
        if run.start < run.max_steps or not any(d.name == f"step-{step}" for d in folders):
            methods.validate(run, step)
        run.stages.save(run.out / "stages.json")
        write_report_safely(run.out, run.stages.records, portable_settings(run.cfg), run.say)
        publish.publish(run.cfg, run.out, run.prep.src.root, folders, step, run.say)  # model card, hub
    run.accelerator.end_training()
    median = sorted(step_times)[len(step_times) // 2] if step_times else None
    folders = run.validator.folders if run.validator else []
    return RunResult(run.out, lora_path, step, last_loss, median, run.stages.records, folders)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> RunResult:
    """Runs every stage of ``sd3booth train``; returns what it produced."""
    run = _open(cfg, log)
    try:
        with speed.persistent_compile_cache(speed.compile_cache_dir() if run.place.memory.compiled else None):
            setup(run)
            step, last_loss, step_times = loop(run)
            return finish(run, step, last_loss, step_times)
    except torch.OutOfMemoryError as e:
        stage = run.stages.failed_in or run.stages.current
        (run.out / "oom.json").write_text(json.dumps(memory.out_of_memory_record(run.place.device, e), indent=2))
        raise UserError(out_of_memory_message(stage, run.place, cfg.max_vram is not None)) from None
    finally:
        run.stages.close()
