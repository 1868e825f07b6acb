"""``sd3booth demo``: the whole pipeline on a tiny random SD3 and the bundled dataset, on the CPU.

It shows every stage working (captions from metadata.jsonl, prior preservation with generated class
images, validation, a checkpoint) in about a minute; the images are noise, since the model is random.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from sd3booth.config import TrainConfig, validate


def demo_config(out: Path, model_dir: Path, data_dir: Path) -> TrainConfig:
    return TrainConfig(
        pretrained_model_name_or_path=str(model_dir),
        instance_data_dir=str(data_dir),
        output_dir=str(out / "run"),
        overwrite_output_dir=True,
        resolution=64,
        train_batch_size=2,
        max_train_steps=40,
        learning_rate=1e-3,
        rank=4,
        seed=0,
        lr_warmup_steps=0,
        random_flip=True,
        with_prior_preservation=True,
        class_data_dir=str(out / "class_images"),
        class_prompt="a photo of a toy",
        num_class_images=4,
        validation_prompt="a photo of sks toy on a beach",
        num_validation_images=2,
        validation_steps=20,
        num_inference_steps=4,
        checkpointing_steps=20,
        checkpoints_total_limit=1,
        report_to="tensorboard",
    )


def run_demo(out: Path) -> Path:
    from sd3booth.models import source
    from sd3booth.random_model import write_random_model
    from sd3booth.report import generate_command
    from sd3booth.train import loop

    source.quiet_libraries()
    t0 = time.perf_counter()
    model_dir = out / "tiny-sd3"
    if not (model_dir / "model_index.json").is_file():
        print(f"writing a tiny random SD3 to {model_dir}")
        write_random_model(model_dir, "tiny", seed=0, device="cpu")
    data_dir = Path(str(resources.files("sd3booth") / "demo_data"))
    cfg = demo_config(out, model_dir, data_dir)
    validate(cfg)
    result = loop.train(cfg)
    seconds = time.perf_counter() - t0
    print()
    print(f"sd3booth demo: done in {seconds:.0f} s")
    print(f"  LoRA              {result.lora_path}")
    print(f"  steps             {result.steps}, final loss {result.final_loss:.4f}")
    print(f"  validation images {', '.join(str(d) for d in result.validation_dirs)}")
    print(f"  settings          {Path(cfg.output_dir) / 'settings.json'}")
    print(
        f"  metrics           {Path(cfg.output_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.output_dir) / 'logs'})"
    )
    print(f"  class images      {cfg.class_data_dir}")
    print(f"  report            {Path(cfg.output_dir) / 'report.html'} (open it in a browser)")
    print("  stages:")
    for r in result.stages:
        print(f"    {r['stage']:<26} {r['seconds']:7.2f} s")
    print("The model is random, so the images are noise; point --pretrained_model_name_or_path at SD3 for real ones.")
    print(f"Draw with the LoRA: {generate_command(result.output_dir, cfg.to_dict())}")
    return result.lora_path
