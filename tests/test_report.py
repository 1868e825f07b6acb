"""report.html: rewritten at each validation and at the end of a real run, rebuilt by `sd3booth report`, and
seen by headless Chromium: no console errors, nothing fetched from the network, the chart and the grid drawn."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from sd3booth.cli import main
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.report import charts, page, read

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from headless_chromium import find_chromium, load_page  # noqa: E402

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A 4-step run validating at steps 2 and 4; every report the loop writes is kept as it was then."""
    import sd3booth.report as report_package

    tmp = tmp_path_factory.mktemp("report-run")
    data = tmp / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp / "out"
    snapshots: list[str] = []

    def recording(o, stages=None, settings=None):
        path = real(o, stages, settings)
        snapshots.append(path.read_text(encoding="utf-8"))
        return path

    real = report_package.write_report
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_package, "write_report", recording)
        args = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
                "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64",
                "--max_train_steps", "4", "--train_batch_size", "1", "--logging_steps", "1", "--seed", "0",
                "--validation_prompt", "a photo of sks toy on a beach", "--validation_steps", "2",
                "--num_validation_images", "2", "--num_inference_steps", "2", "--rank", "8",
                "--report_to", "none"]  # fmt: skip
        assert main(args) == 0
    return out, snapshots


def test_report_is_rewritten_at_each_validation_and_at_the_end(run, capsys):
    out, snapshots = run
    # after the validation at step 2 (mid-run), after the last validation, and once stages.json is written
    assert len(snapshots) == 3
    mid, final = snapshots[0], snapshots[-1]
    assert "in progress" in mid and "step 2 of 4" in mid
    assert "validation/step-2/000.png" in mid and "step-4" not in mid
    assert "finished" in final and "step 4 of 4" in final
    assert final == (out / "report.html").read_text(encoding="utf-8").replace(
        re.search(r"written [0-9-]+ [0-9:]+", (out / "report.html").read_text())[0],
        re.search(r"written [0-9-]+ [0-9:]+", final)[0],
    )
    # the grid: 2 images x 2 validations, each a data URI thumbnail linking to the full-size PNG
    assert len(re.findall(r'<img alt="step \d+ 00\d\.png" src="data:image/jpeg;base64,', final)) == 4
    for rel in ("validation/step-2/000.png", "validation/step-4/001.png"):
        assert f'href="{rel}"' in final and (out / rel).is_file()
    # charts are inline SVG, and nothing on the page points off the machine
    assert final.count("<svg") >= 2 and "<script" not in final
    assert not re.search(r'(src|href)="(https?:)?//', final)
    # the settings that differ from the defaults, with the default beside them
    assert re.search(r"<td>rank</td><td class=\"n\">8</td><td class=\"n\">4</td>", final)
    assert "<td>train_batch_size</td>" in final and "<td>adam_beta1</td>" not in final


def test_end_of_run_summary_points_to_the_report_and_generate(tiny_model, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=1, size=64)
    out = tmp_path / "out dir"
    assert main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
                 "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "1", "--train_batch_size",
                 "1", "--report_to", "none", "--instance_prompt", "a photo of sks toy"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").is_file()
    line = next(ln for ln in text.splitlines() if ln.startswith("draw:"))
    command = line.removeprefix("draw:").strip()
    import shlex

    argv = shlex.split(command)
    assert argv[:2] == ["sd3booth", "generate"] and argv[argv.index("--prompt") + 1] == "a photo of sks toy"
    # the printed command runs as printed (quoted path with a space)
    assert main([*argv[1:], "--num_images", "1", "--num_inference_steps", "1", "--output_dir",
                 str(tmp_path / "gen")]) == 0  # fmt: skip
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_report_command_rebuilds_any_run_folder_and_shows_optional_tables(run, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("cache", "checkpoints", "logs"))
    (copy / "report.html").unlink()
    (copy / "buckets.json").write_text(json.dumps([{"width": 64, "height": 64, "images": 2}]))
    (copy / "cache.json").write_text(json.dumps({"text": {"entries": 3, "cached": 1}, "latents": {"entries": 2}}))
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    text = (copy / "report.html").read_text()
    assert "<h2>Aspect-ratio buckets</h2>" in text and "<th>width</th>" in text
    assert "<h2>Cache hits</h2>" in text and "<td>latents</td>" in text
    # an older or interrupted run: only metrics.jsonl, nothing else
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "metrics.jsonl", bare)
    with (bare / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line being written when the report is made
    assert main(["report", str(bare)]) == 0
    text = (bare / "report.html").read_text()
    assert "in progress" in text and "No validation images yet" in text and "<svg" in text
    # not a run folder: one line, exit 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: report:") for e in err)


def test_stage_table_sets_measured_memory_beside_the_plans_prediction(tmp_path):
    stages = [
        {"stage": "text encoder T5 (bf16)", "seconds": 3.0, "peak_allocated_gib": 9.1, "peak_reserved_gib": 9.5,
         "peak_process_gpu_gib": 10.0, "peak_host_rss_gib": 4.0, "allocated_after_gib": 0.1},
        {"stage": "validation step 20", "seconds": 2.0, "peak_allocated_gib": 5.0, "peak_host_rss_gib": 3.0},
        {"stage": "load transformer", "seconds": 1.0, "peak_allocated_gib": 4.0, "peak_host_rss_gib": 2.5,
         "peak_host_rss_parts_gib": {"anon": 2.0, "file": 0.45, "shmem": 0.05}},
    ]  # fmt: skip
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    plan = {"budget_gib": 14.0, "t5": "bf16", "predicted": {"T5": 9.0, "validation": 5.5},
            "predicted_host": {"T5": 4.5}}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    html = page.stages_html(read.read_run(tmp_path))
    head = re.findall(r"<th>([^<]*)</th>", html)
    assert head == ["stage", "seconds", "GPU peak allocated GiB", "GPU peak reserved GiB", "GPU whole process GiB",
                    "GPU allocated after GiB", "host RSS peak GiB", "host RSS at its peak: anon / file / shmem GiB",
                    "plan: GPU GiB", "plan: host GiB"]  # fmt: skip
    rows = re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", html)
    cells = {name: re.findall(r">([^<]*)</td>", rest) for name, rest in rows}
    assert cells["text encoder T5 (bf16)"][-2:] == ["9", "4.5"]
    assert cells["validation step 20"][-2:] == ["5.5", "–"] and cells["load transformer"][-2:] == ["–", "–"]
    assert cells["load transformer"][-3] == "2.00 / 0.45 / 0.05"  # what the host peak was made of
    assert 'id="memory-chart"' in html and html.count("<svg") == 1
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "budget_gib": 0.0}))  # a CPU run: no predictions
    assert "plan:" not in page.stages_html(read.read_run(tmp_path))


def test_smoothing_and_column_spread():
    assert charts.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    s = charts.smooth([0.0, 10.0], weight=0.5)
    assert s[0] == 0.0 and s[1] == pytest.approx((0.5 * 10) / (0.5 * 0.5 + 0.5))  # TensorBoard: 6.67
    assert page.spread(list(range(30)), 5) == [0, 7, 14, 22, 29]
    assert page.spread([1, 2], 12) == [1, 2]
    assert read.changed_settings({"rank": 4, "resolution": 1024, "lora_layers": None}) == [("resolution", 1024, 512)]


def test_grid_shows_at_most_max_columns(tmp_path):
    for step in range(0, 200, 10):
        d = tmp_path / "validation" / f"step-{step}"
        d.mkdir(parents=True)
        Image.new("RGB", (32, 32), (step, 0, 0)).save(d / "000.png")
    html = page.grid_html(read.read_run(tmp_path))
    assert html.count("<img ") == page.MAX_COLUMNS and "step 0<" in html and "step 190<" in html
    assert "(20 validations, 12 shown)" in html


def _busy(png: bytes, box: list[float]) -> float:
    """Share of the box's pixels that differ from its most common colour (0 for a blank region)."""
    x, y, w, h = (int(v) for v in box)
    region = Image.open(io.BytesIO(png)).convert("RGB").crop((x, y, x + w, y + h))
    colours = region.getcolors(maxcolors=w * h)
    return 1 - max(colours)[0] / (w * h)


@needs_chromium
def test_report_in_headless_chromium(run):
    out, _ = run
    sel = ("#training-chart svg", "#grid", "#memory-chart svg", "h1")
    result = load_page((out / "report.html").as_uri(), sel, width=1200)
    assert result.errors == []
    assert all(u.startswith(("file:", "data:")) for u in result.requests), result.requests
    shot = Image.open(io.BytesIO(result.png))
    assert shot.width == 1200 and shot.height == result.height > 1500
    for s in sel:
        assert result.boxes[s] is not None, s
        x, y, w, h = result.boxes[s]
        assert w > 100 and h > 15 and y + h <= shot.height, (s, result.boxes[s])
    assert _busy(result.png, result.boxes["#training-chart svg"]) > 0.02  # axes, lines, labels drawn
    assert _busy(result.png, result.boxes["#grid"]) > 0.3  # four noisy validation thumbnails
    assert _busy(result.png, result.boxes["#memory-chart svg"]) > 0.02


@needs_chromium
def test_the_chromium_check_sees_errors_and_network_use(tmp_path):
    """The check above can fail: a page with a script error, a console error and a remote image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><p id="x">x</p><img src="https://example.invalid/a.png">'
        '<script>console.error("bad thing"); throw new Error("boom")</script></body></html>'
    )
    result = load_page(bad.as_uri(), ("#x", "#missing"))
    assert any("bad thing" in e for e in result.errors) and any("boom" in e for e in result.errors)
    assert "https://example.invalid/a.png" in result.requests
    assert result.boxes["#missing"] is None and result.boxes["#x"][2] > 0
