"""`sd3booth lora merge|resize|extract|info` against the exact dense results on the tiny model."""

from __future__ import annotations

import re
import shutil

import torch
from lora_helpers import write_trained_lora
from safetensors.torch import load_file, save_file

from sd3booth.adapters import layouts
from sd3booth.cli import main
from sd3booth.single_file_writer import write_single_file

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def _dense(path):
    return {n: layouts.delta(d, u) for n, (d, u) in layouts.read_lora(path).modules.items()}


def _truncated(m, r):
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], s


def _reported(out, what):
    return float(re.search(rf"{what} ([\d.]+)%", out).group(1)) / 100


def test_merge_is_the_exact_weighted_sum_and_truncates_like_dense_svd(tiny_model, tmp_path, capsys):
    a = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=ATTN + ["ff.net.2"], rank=4, seed=1)
    b = write_trained_lora(tiny_model, tmp_path / "b.safetensors", layers=ATTN + ["attn.add_q_proj"], rank=2, seed=2)
    kohya_b = tmp_path / "b_kohya.safetensors"
    assert main(["lora", "convert", str(b), str(kohya_b), "--to", "kohya", "--save_precision", "fp32"]) == 0
    da, db = _dense(a), _dense(b)
    exact = {n: 0.7 * da.get(n, 0) + 0.5 * db.get(n, 0) for n in set(da) | set(db)}
    out = tmp_path / "m.safetensors"
    assert main(["lora", "merge", f"{a}:0.7", f"{kohya_b}:0.5", "-o", str(out), "--save_precision", "fp32"]) == 0
    merged = _dense(out)
    assert set(merged) == set(exact)
    for n in exact:
        torch.testing.assert_close(merged[n], exact[n].float(), rtol=1e-4, atol=1e-5)
    assert layouts.read_lora(out).ranks == [2, 4, 6]  # the exact rank of each sum
    capsys.readouterr()
    out2 = tmp_path / "m2.safetensors"
    assert (
        main(
            ["lora", "merge", f"{a}:0.7", f"{kohya_b}:0.5", "-o", str(out2), "--rank", "2", "--save_precision", "fp32"]
        )
        == 0
    )
    kept = total = 0.0
    for n, d in _dense(out2).items():
        ref, s = _truncated(exact[n], 2)
        torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-5)
        kept, total = kept + float((s[:2] ** 2).sum()), total + float((s**2).sum())
    assert abs(_reported(capsys.readouterr().out, "kept") - kept / total) < 1e-5


def test_resize_by_rank_and_by_energy(tiny_model, tmp_path, capsys):
    src = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=ATTN, rank=8, seed=3)
    exact = _dense(src)
    out = tmp_path / "r.safetensors"
    capsys.readouterr()
    assert main(["lora", "resize", str(src), "--rank", "3", "-o", str(out), "--save_precision", "fp32"]) == 0
    err2 = tot2 = 0.0
    for n, d in _dense(out).items():
        ref, s = _truncated(exact[n], 3)
        torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-5)
        err2, tot2 = err2 + float((s[3:] ** 2).sum()), tot2 + float((s**2).sum())
    assert abs(_reported(capsys.readouterr().out, "relative error") - (err2 / tot2) ** 0.5) < 1e-4
    out = tmp_path / "e.safetensors"
    assert main(["lora", "resize", str(src), "--energy", "0.9", "-o", str(out), "--to", "comfyui"]) == 0
    lf = layouts.read_lora(out)
    for n, (d, _u) in lf.modules.items():
        s = torch.linalg.svdvals(exact[n].double())
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        assert d.shape[0] == int((share < 0.9 - 1e-12).sum()) + 1  # the smallest rank keeping 90 %
    assert lf.format == "comfyui"


def _tuned_model(tiny_model, tmp_path):
    """A copy of the tiny model whose attention weights moved by a rank-3 change (and the first block's
    feed-forward by a full-rank one)."""
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model, tuned)
    f = next((tuned / "transformer").glob("*.safetensors"))
    state = load_file(f)
    g = torch.Generator().manual_seed(7)
    for k, w in state.items():
        if k.endswith(".weight") and w.ndim == 2 and any(f".{layer}." in k for layer in ATTN):
            state[k] = w + torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.1
        if k == "transformer_blocks.0.ff.net.2.weight":
            state[k] = w + torch.randn(w.shape, generator=g) * 0.05
    save_file(state, f)
    return tuned


def test_extract_matches_the_dense_svd_of_the_difference(tiny_model, tmp_path, capsys):
    tuned = _tuned_model(tiny_model, tmp_path)
    base_w = load_file(next((tiny_model / "transformer").glob("*.safetensors")))
    tuned_w = load_file(next((tuned / "transformer").glob("*.safetensors")))
    out = tmp_path / "x.safetensors"
    argv = ["lora", "extract", "--base", str(tiny_model), "--tuned", str(tuned), "--rank", "3", "--lora_layers", "all",
            "--device", "cpu", "--save_precision", "fp32"]  # fmt: skip
    assert main([*argv, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    got = _dense(out)
    changed = {k[: -len(".weight")] for k in base_w if not torch.equal(base_w[k], tuned_w[k])}
    assert {n.removeprefix("transformer.") for n in got} == changed
    assert "unchanged" in printed
    for n, d in got.items():
        k = n.removeprefix("transformer.") + ".weight"
        ref, _s = _truncated(tuned_w[k] - base_w[k], 3)
        torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-5)
    # the same extraction from single files (Stability's layout, q/k/v fused on disk)
    sf_base, sf_tuned = write_single_file(tiny_model, tmp_path / "b.sft"), write_single_file(tuned, tmp_path / "t.sft")
    out2 = tmp_path / "x2.safetensors"
    argv2 = ["lora", "extract", "--base", str(sf_base), "--tuned", str(sf_tuned), "--rank", "3", "--lora_layers", "all",
             "--device", "cpu", "--save_precision", "fp32", "-o", str(out2)]  # fmt: skip
    assert main(argv2) == 0
    again = _dense(out2)
    assert set(again) == set(got)
    for n in got:
        torch.testing.assert_close(again[n], got[n], rtol=1e-5, atol=1e-6)


def test_info_reports_format_rank_alpha_and_targets(tiny_model, tmp_path, capsys):
    src = write_trained_lora(tiny_model, tmp_path / "a.safetensors", layers=["attn.to_q", "attn.to_k"], rank=4)
    kohya = tmp_path / "k.safetensors"
    assert main(["lora", "convert", str(src), str(kohya), "--to", "kohya"]) == 0
    capsys.readouterr()
    assert main(["lora", "info", str(kohya)]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out and "rank: 4" in out and "alpha: 8" in out  # q,k fused: 2 x 4, alpha = rank
    assert "attn.to_q x2" in out and "blocks: 0-1" in out and "sd3booth.converted_from" in out
