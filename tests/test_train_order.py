"""Data order: every item once per epoch, disjoint across processes, a pure function of (seed, step)."""

import os
import shutil
import subprocess

import pytest

from sd3booth.train.order import DataOrder, step_seed


def test_each_epoch_visits_every_item_once_across_processes():
    order = DataOrder([0] * 12, batch=2, processes=3, seed=7)
    assert order.batches_per_epoch == 2
    for epoch in range(3):
        seen = [i for m in range(epoch * 2, epoch * 2 + 2) for r in range(3) for i in order.items(m, r)]
        assert sorted(seen) == list(range(12))
    # each epoch draws its own permutation (seed 7: epochs 0 and 1 differ in their first batch)
    assert [order.items(m, r) for m in (0, 1) for r in range(3)] != [
        order.items(m, r) for m in (2, 3) for r in range(3)
    ]
    epoch0 = [order.items(m, r) for m in (0, 1) for r in range(3)]
    assert epoch0 != [[2 * k, 2 * k + 1] for k in range(6)]  # shuffled, not in file order


def test_last_partial_batch_is_kept_and_order_is_stateless():
    """As the reference's DataLoader (drop_last False): 5 items in batches of 2 are 3 batches, the last of 1."""
    a = DataOrder([0] * 5, batch=2, processes=1, seed=1)
    assert a.batches_per_epoch == 3
    assert sorted(len(a.items(m, 0)) for m in range(3)) == [1, 2, 2]
    assert sorted(i for m in range(3) for i in a.items(m, 0)) == list(range(5))
    b = DataOrder([0] * 5, batch=2, processes=1, seed=1)
    assert [a.items(m, 0) for m in range(9)] == [b.items(m, 0) for m in reversed(range(9))][::-1]


def test_uneven_batches_across_processes_repeat_the_first_ones():
    """3 batches over 2 processes: each process takes 2 per epoch; the 4th is the epoch's first again."""
    order = DataOrder([0] * 6, batch=2, processes=2, seed=0)
    assert order.batches_per_epoch == 2
    taken = [order.items(m, r) for m in range(2) for r in range(2)]
    assert taken[3] == taken[0] and sorted(i for b in taken[:3] for i in b) == list(range(6))


def test_step_seeds_differ_by_step_and_rank():
    seeds = {step_seed(0, m, r) for m in range(50) for r in range(4)}
    assert len(seeds) == 200


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_with_ddp_on_cpu(tiny_model, tmp_path):
    """What `accelerate launch --num_processes 2` runs: torchrun + gloo on the CPU."""
    from sd3booth.data.dataset import write_demo_like_dataset

    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=4, size=64)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "sd3booth",
        "train",
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--instance_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "3",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--checkpointing_steps",
        "3",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 process(es)" in r.stdout + r.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoints" / "checkpoint-3").is_dir()
