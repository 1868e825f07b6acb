"""``sd3booth bench``: memory and speed of every stage on the GPU, beside the stock stack, in one run.

Parts (``--parts``, any of), one module each:
* ``stock``     (:mod:`.stock`) the stock stack of the notes: diffusers transformer + peft LoRA + bitsandbytes
                AdamW8bit, bf16 autocast, gradient checkpointing, eager; peak memory and s/step per resolution.
* ``calibrate`` (:mod:`.calibrate`) our loading code, stage by stage: each text encoder and T5 mode, VAE
                encode/decode whole and tiled, training steps for each storage/checkpointing/swap/offload
                option; the error of NF4/fp8 bases and of quantised/streamed/CPU T5.
* ``budgets``   (:mod:`.budgets`) the real ``sd3booth train`` CLI, one subprocess per ``--max_vram`` budget, each
                under a hard cap on its GPU memory (:mod:`.capped`), so exceeding the budget fails the run.
* ``speed``     (:mod:`.speed`) the training step of our stack (eager and compiled) against the stock stack at
                batch 1 and 4, model-FLOP utilisation, compiled-vs-eager parity, a profile of each.
* ``long``      (:mod:`.speed`) a whole run of N steps of each stack, compilation included.
* ``reference`` (:mod:`.runs`, :mod:`.reference`) diffusers' ``train_dreambooth_lora_sd3.py`` (``--reference_script
                PATH``, never copied here) at its fastest beside ``sd3booth train`` (default plan, ``--max_vram 3``),
                each a subprocess sampled from outside; the ratios of the speed targets.
* ``whole``     (:mod:`.runs`) an N-step run of the script and of ours, everything included, wall time.
* ``coldstart`` (:mod:`.runs`) our default plan twice with one fresh compile cache: the first step cold, then warm.

:mod:`.run` runs them (``run_bench``), :mod:`.fit` fits ``calibration.json`` from what calibrate, budgets and
speed measured (pure; ``sd3booth bench --refit bench/results`` refits the packaged file from the stored
results), :mod:`.report` writes the markdown, :mod:`.harness` holds what the GPU parts share.

Random weights at true size: the numbers say everything about memory and speed, nothing about quality.
Importing this package loads nothing heavy; the GPU modules import torch.
"""
