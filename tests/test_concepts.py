"""Several concepts (--dataset_config), validation prompt lists, caption dropout, numbered epochs, and the
guards: output folders inside data folders, long captions, a scan that never reads the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd3booth.cache.text import TextEmbedding
from sd3booth.cli import main
from sd3booth.config.datasets import read_dataset_config
from sd3booth.data import concepts
from sd3booth.data.concepts import Concept, Item
from sd3booth.data.dataset import Example, scan_images, write_demo_like_dataset
from sd3booth.errors import UserError
from sd3booth.train.batch import BatchSource, make_batch
from sd3booth.train.order import DataOrder

FAST = ["--resolution", "64", "--train_batch_size", "1", "--report_to", "none", "--seed", "0",
        "--num_inference_steps", "1", "--lr_warmup_steps", "0"]  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- the dataset config -----------------------------------------------------------------------------------


def test_dataset_config_entries_over_the_flags(tmp_path):
    toml = _write(tmp_path / "data.toml", """
[[datasets]]
instance_data_dir = "dog"
instance_prompt = "a photo of sks dog"
class_data_dir = "dogs"
class_prompt = "a photo of a dog"
prior_loss_weight = 0.5

[[datasets]]
instance_data_dir = "mug"
repeats = 3
resolution = 48
""")  # fmt: skip
    entries = read_dataset_config(toml)
    assert entries[0]["instance_data_dir"] == str((tmp_path / "dog").resolve())  # relative to the file
    default = Concept("", instance_prompt="flag prompt", repeats=2, resolution=64, num_class_images=7)
    dog, mug = concepts.concepts_from_entries(entries, default, True, str(toml))
    assert (dog.prior, dog.prior_loss_weight, dog.repeats, dog.num_class_images) == (True, 0.5, 2, 7)
    assert (mug.prior, mug.repeats, mug.resolution, mug.instance_prompt) == (False, 3, 48, "flag prompt")
    with pytest.raises(UserError, match="no class images are used; add --with_prior_preservation"):
        concepts.concepts_from_entries(entries, default, False, str(toml))
    with pytest.raises(UserError, match="no entry of .* has a class_data_dir"):
        concepts.concepts_from_entries(entries[1:], default, True, str(toml))


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('[[datasets]]\ninstance_data_dir = "a"\ninstance_promt = "x"\n',
         ["entry 1", "unknown key 'instance_promt'", "did you mean instance_prompt"]),
        ('[[datasets]]\ninstance_data_dir = "a"\n[[datasets]]\ninstance_data_dir = "b"\nrepeat = 2\n',
         ["entry 2", "'repeat'", "did you mean repeats"]),
        ('[[dataset]]\ninstance_data_dir = "a"\n', ["unknown key 'dataset'", "did you mean datasets"]),
        ('[[datasets]]\ninstance_data_dir = "a"\nrepeats = "two"\n', ["entry 1", "'repeats' should be int"]),
        ('[[datasets]]\ninstance_prompt = "a"\n', ["entry 1 has no instance_data_dir"]),
        ('[[datasets]]\ninstance_data_dir = "a"\nresolution = 100\n', ["resolution 100", "multiple of 16"]),
        ("datasets = []\n", ["has no [[datasets]] entries"]),
        ("[[datasets]\n", ["is not valid TOML"]),
    ],
)  # fmt: skip
def test_bad_dataset_configs_are_one_line(text, needles, tmp_path):
    toml = _write(tmp_path / "data.toml", text)
    with pytest.raises(UserError) as e:
        read_dataset_config(toml)
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_dataset_key_through_the_cli(tiny_model, tmp_path, capsys):
    toml = _write(tmp_path / "d.toml", '[[datasets]]\ninstance_data_dir = "x"\nclass_folder = "y"\n')
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--dataset_config", str(toml),
               "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown key 'class_folder'" in err and "Traceback" not in err


def test_two_concepts_with_their_own_prior_resolution_and_repeats_train(tiny_model, tmp_path, capsys):
    write_demo_like_dataset(tmp_path / "toys", n=2, size=64)
    write_demo_like_dataset(tmp_path / "mugs", n=2, size=64, seed=3)
    for p in (tmp_path / "mugs").glob("*.png"):
        p.rename(p.with_name("mug_" + p.name))
    (tmp_path / "mugs" / "metadata.jsonl").unlink()
    toml = _write(tmp_path / "data.toml", """
[[datasets]]
instance_data_dir = "toys"
class_data_dir = "class"
class_prompt = "a toy"
num_class_images = 2

[[datasets]]
instance_data_dir = "mugs"
instance_prompt = "a photo of zwx mug"
repeats = 2
resolution = 48
""")  # fmt: skip
    out = tmp_path / "out"
    args = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--dataset_config", str(toml),
            "--with_prior_preservation", "--output_dir", str(out), "--num_train_epochs", "1",
            "--validation_prompt", "sks toy", "--validation_prompt", "zwx mug", "--num_validation_images", "1",
            *FAST]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    # an epoch: toys max(2, 2 class) = 2 items, mugs 2 x 2 repeats = 4 items; batch 1 -> 6 steps
    assert "training 6 steps" in text
    assert "64x64" in text and "48x48" in text  # the table: one size per concept resolution
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert sorted(p.name for p in (out / "validation" / "step-6").glob("*.png")) == ["p0-000.png", "p1-000.png"]
    captions = {json.loads(json.dumps(p.name)) for p in (out / "cache" / "text").glob("*.safetensors")}
    assert len(captions) == 2 + 1 + 1 + 1 + 2  # toy captions, mug prompt, "", class prompt, 2 validation prompts


# ---- validation prompts -------------------------------------------------------------------------------------


def test_validation_prompt_is_repeatable_or_a_file_or_a_toml_list(tmp_path):
    from sd3booth.cli import build_parser
    from sd3booth.config import build_config
    from sd3booth.prepare import validation_prompts

    parser = build_parser()[1]["train"]
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]
    cfg = build_config(vars(parser.parse_args([*base, "--validation_prompt", "a", "--validation_prompt", "b"])))
    assert cfg.validation_prompt == ["a", "b"]
    prompts = _write(tmp_path / "p.txt", "# my prompts\nc\n\n  d  \n")
    cfg = build_config(vars(parser.parse_args([*base, "--validation_prompt", "a", "--validation_prompt_file",
                                               str(prompts)])))  # fmt: skip
    assert validation_prompts(cfg) == ["a", "c", "d"]
    toml = _write(tmp_path / "run.toml", 'validation_prompt = ["x", "y"]\n')
    assert build_config(vars(parser.parse_args([*base, "--config", str(toml)]))).validation_prompt == ["x", "y"]
    one = _write(tmp_path / "one.toml", 'validation_prompt = "x"\n')
    assert build_config(vars(parser.parse_args([*base, "--config", str(one)]))).validation_prompt == ["x"]
    with pytest.raises(UserError, match="holds no prompt"):
        validation_prompts(build_config(vars(parser.parse_args(
            [*base, "--validation_prompt_file", str(_write(tmp_path / "e.txt", "# nothing\n"))]))))  # fmt: skip


# ---- caption dropout ----------------------------------------------------------------------------------------


def _dropout_source(rate: float, seed: int = 0, prior: bool = False) -> BatchSource:
    ex = [Example(f"{i}.png", Path(f"{i}.png"), f"cap{i}", "x") for i in range(4)]
    cls = [Example("c.png", Path("c.png"), "class", "class_prompt", is_class=True)]
    items = [Item(i, 0 if prior else None, (16, 16), 0) for i in range(4)]
    lat = {f"{e.uid}": (torch.zeros(16, 2, 2), torch.zeros(16, 2, 2)) for e in ex + cls}
    text = {c: TextEmbedding(torch.full((3, 4), float(i)), torch.zeros(2)) for i, c in enumerate(
        ["", "class", "cap0", "cap1", "cap2", "cap3"])}  # fmt: skip
    return BatchSource(ex, cls, items, DataOrder([(16, 16)] * 4, 2, 1, seed), lat,
                       {(e.uid, (16, 16), False): e.uid for e in ex + cls}, text, {c: c for c in text}, False, False,
                       0.0, 1.0, seed, (1.0,), "", rate)  # fmt: skip


def _dropped(src: BatchSource, steps: int = 300) -> list[bool]:
    out = []
    for m in range(steps):
        b = make_batch(src, m, 0)
        out += [bool(v) for v in (b.prompt_embeds[: b.n_instance, 0, 0] == 0)]
    return out


def test_caption_dropout_rate_is_kept_and_fixed_by_the_seed():
    drops = _dropped(_dropout_source(0.3))
    assert len(drops) == 600 and abs(sum(drops) / 600 - 0.3) < 0.05
    assert drops == _dropped(_dropout_source(0.3))  # deterministic under --seed
    assert drops != _dropped(_dropout_source(0.3, seed=1))
    assert not any(_dropped(_dropout_source(0.0), 50)) and all(_dropped(_dropout_source(1.0), 50))
    # class captions are never dropped, and the dropout leaves every other draw (latents, crops, noise) alone
    b = make_batch(_dropout_source(1.0, prior=True), 0, 0)
    assert (b.prompt_embeds[b.n_instance :, 0, 0] == 1).all()
    torch.manual_seed(0)
    a0 = make_batch(_dropout_source(0.0), 5, 0)
    after_a = torch.rand(())
    b0 = make_batch(_dropout_source(0.7), 5, 0)
    assert torch.equal(a0.x0, b0.x0) and torch.equal(after_a, torch.rand(()))


# ---- guards -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "equal", "cache", "class"])
def test_output_folder_inside_a_data_folder_is_refused(where, tiny_model, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out, extra = tmp_path / "out", []
    if where == "inside":
        out = data / "run"
    elif where == "equal":
        out = data
    elif where == "cache":
        extra = ["--cache_dir", str(data / "cache")]
    else:
        out = tmp_path / "class" / "run"
        extra = ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a toy"]
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
               "--output_dir", str(out), *FAST, *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "is inside" in err and "the next run would train on this run's files" in err
    assert not (out / "settings.json").exists() and not (data / "cache").exists()


def test_scans_never_read_outputs_class_or_mask_folders(tmp_path):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    for sub in ("run/validation/step-1", "class", "masks"):
        write_demo_like_dataset(data / sub, n=1, size=64)
    c = Concept(str(data), instance_prompt="x", class_data_dir=str(data / "class"), mask_dir=str(data / "masks"))
    found = concepts.scan_concepts([c], None, "caption", "file_name", [data / "run"], print)
    assert [ex.id for ex in found] == ["toy_00.png", "toy_01.png"]
    assert len(scan_images(data, instance_prompt="x")) == 5  # what a scan without the exclusions would read


def test_long_captions_get_one_warning_with_counts_and_the_hint(tiny_model, tmp_path, capsys):
    from sd3booth.cache.text import long_caption_warning
    from sd3booth.models.source import resolve_model

    src = resolve_model(str(tiny_model))
    long = "a photo of sks toy " + "with many details " * 110  # ~2000 characters (these tokenizers: 1 per char)
    line = long_caption_warning([long, long + "!", "short one", "x" * 100], src, 77)
    assert line.startswith("warning: ") and "\n" not in line
    t5 = line.split("T5 reads 77 tokens and drops ")[1].split(";")[0]
    from transformers import AutoTokenizer

    t5_tok = AutoTokenizer.from_pretrained(tiny_model / "tokenizer_3")
    dropped = sum(len(t5_tok(c).input_ids) - 77 for c in (long, long + "!", "x" * 100))
    assert t5 == f"{dropped} token(s) of 3 caption(s)"
    assert "CLIP reads 77 tokens" in line and "--max_sequence_length (now 77" in line
    assert long_caption_warning(["short"], src, 77) is None
    only_clip = long_caption_warning(["y" * 100], src, 256)
    assert "T5 still reads them whole" in only_clip
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    (data / "metadata.jsonl").unlink()  # every image takes --instance_prompt
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(data),
               "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--instance_prompt", long,
               *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and err.count("T5 reads 77 tokens and drops") == 1  # one warning, though scanned twice
