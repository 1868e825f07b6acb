"""Settings: defaults (the diffusers script's), config files (TOML / JSON / settings.json), flags, validation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from sd3booth.cli import build_parser, main
from sd3booth.config import FIELDS, TrainConfig, build_config, load_config_file, validate
from sd3booth.data.dataset import write_demo_like_dataset
from sd3booth.errors import UserError

REQUIRED = ["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "photos"]


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """Tests never download anything (tests/conftest.py belongs to someone else, so it is set here too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="session")
def tiny_sd3(_offline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD3 pipeline (about 6 MB), written once per session."""
    from sd3booth.random_model import write_random_model

    return Path(write_random_model(tmp_path_factory.mktemp("tiny-sd3-config"), "tiny", device="cpu"))


def train_parser():
    return build_parser()[1]["train"]


def config_from(argv: list[str]) -> TrainConfig:
    """What ``sd3booth train ARGV`` would train with (the CLI's own parser and merge)."""
    return build_config(vars(train_parser().parse_args(argv)))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- defaults ----------------------------------------------------------------------------------------------

DIFFUSERS_DEFAULTS = {
    "learning_rate": 1e-4,
    "rank": 4,
    "resolution": 512,
    "train_batch_size": 4,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "precondition_outputs": 1,
    "prior_loss_weight": 1.0,
    "num_class_images": 100,
    "max_sequence_length": 77,
    "checkpointing_steps": 500,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-4,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "report_to": "tensorboard",
}


@pytest.mark.parametrize("name", list(DIFFUSERS_DEFAULTS))
def test_defaults_match_the_diffusers_script(name):
    expected = DIFFUSERS_DEFAULTS[name]
    assert getattr(TrainConfig(), name) == expected
    # and no flag default leaks in: the CLI with only the required flags trains with the same value
    got = getattr(config_from(REQUIRED), name)
    assert got == expected and type(got) is type(expected)


def test_cli_with_only_required_flags_equals_dataclass_defaults():
    cfg = config_from(REQUIRED)
    expected = dataclasses.replace(
        TrainConfig(), pretrained_model_name_or_path="some/model", instance_data_dir="photos"
    )
    assert cfg == expected


# ---- flags vs config files ---------------------------------------------------------------------------------


def test_flags_override_toml(tmp_path):
    toml = write(tmp_path / "run.toml", 'learning_rate = 0.5\nrank = 8\nlr_scheduler = "cosine"\nseed = 3\n')
    cfg = config_from([*REQUIRED, "--config", str(toml), "--learning_rate", "0.25", "--seed", "11"])
    assert cfg.learning_rate == 0.25 and cfg.seed == 11  # flags win
    assert cfg.rank == 8 and cfg.lr_scheduler == "cosine"  # the file fills what the flags leave out
    assert cfg.resolution == 512  # defaults fill the rest


def test_toml_can_hold_every_required_setting(tmp_path):
    toml = write(tmp_path / "run.toml", 'pretrained_model_name_or_path = "a/b"\ninstance_data_dir = "photos"\n')
    cfg = config_from(["--config", str(toml)])
    assert cfg.pretrained_model_name_or_path == "a/b" and cfg.instance_data_dir == "photos"


def test_json_config_accepted(tmp_path):
    js = write(tmp_path / "run.json", json.dumps({"rank": 16, "center_crop": True, "learning_rate": 2e-4}))
    cfg = config_from([*REQUIRED, "--config", str(js), "--rank", "32"])
    assert (cfg.rank, cfg.center_crop, cfg.learning_rate) == (32, True, 2e-4)


def test_no_center_crop_flag_overrides_toml_true(tmp_path):
    toml = write(tmp_path / "run.toml", "center_crop = true\nrandom_flip = false\n")
    assert config_from([*REQUIRED, "--config", str(toml)]).center_crop is True
    cfg = config_from([*REQUIRED, "--config", str(toml), "--no-center_crop", "--random_flip"])
    assert cfg.center_crop is False and cfg.random_flip is True


def test_settings_json_of_a_run_is_accepted_by_config(tiny_sd3, tmp_path, capsys):
    data = tmp_path / "photos"
    write_demo_like_dataset(data, n=2, size=64)
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir", str(data),
               "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "1",
               "--num_inference_steps", "2", "--report_to", "none", "--seed", "5", "--rank", "8",
               "--lora_alpha", "16", "--center_crop", "--optimizer", "AdamW"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "settings.json").read_text())
    assert set(record["settings"]) == set(FIELDS)  # settings nested under "settings", every field recorded
    cfg = config_from(["--config", str(out / "settings.json"), "--output_dir", str(tmp_path / "run2")])
    assert cfg.output_dir == str(tmp_path / "run2")
    assert dataclasses.replace(cfg, output_dir=str(out)).to_dict() == record["settings"]
    assert (cfg.rank, cfg.alpha, cfg.center_crop, cfg.seed, cfg.optimizer) == (8, 16, True, 5, "adamw")
    assert load_config_file(out / "settings.json") == record["settings"]


def test_unknown_toml_key_names_file_and_closest_key(tmp_path):
    toml = write(tmp_path / "run.toml", "rank = 8\nlearnig_rate = 1e-4\n")
    with pytest.raises(UserError) as e:
        config_from([*REQUIRED, "--config", str(toml)])
    msg = str(e.value)
    assert str(toml) in msg and "'learnig_rate'" in msg and "did you mean learning_rate" in msg
    assert "\n" not in msg


def test_unknown_key_of_settings_json_names_it(tmp_path):
    js = write(tmp_path / "settings.json", json.dumps({"settings": {"rank": 4, "rnak": 8}, "versions": {}}))
    with pytest.raises(UserError, match=r"rnak.*did you mean rank"):
        load_config_file(js)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('rank = "four"', "rank"),
        ("rank = 4.5", "rank"),
        ("rank = true", "rank"),
        ('center_crop = "yes"', "center_crop"),
        ("center_crop = 1", "center_crop"),
        ('learning_rate = "fast"', "learning_rate"),
        ("learning_rate = false", "learning_rate"),
        ("max_train_steps = [1, 2]", "max_train_steps"),
    ],
)
def test_wrong_type_in_toml_is_user_error(tmp_path, line, key):
    toml = write(tmp_path / "run.toml", line + "\n")
    with pytest.raises(UserError) as e:
        config_from([*REQUIRED, "--config", str(toml)])
    msg = str(e.value)
    assert str(toml) in msg and f"'{key}'" in msg and "\n" not in msg


def test_integral_float_and_int_for_float_are_coerced(tmp_path):
    toml = write(tmp_path / "run.toml", "rank = 8.0\nlearning_rate = 1\n")
    cfg = config_from([*REQUIRED, "--config", str(toml)])
    assert cfg.rank == 8 and type(cfg.rank) is int
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float


def test_table_for_a_text_setting_is_user_error(tmp_path):
    toml = write(tmp_path / "run.toml", "[output_dir]\npath = 'out'\n")
    with pytest.raises(UserError, match="output_dir"):
        config_from([*REQUIRED, "--config", str(toml)])


def test_toml_array_for_lora_layers(tmp_path):
    toml = write(tmp_path / "run.toml", "lora_layers = ['attn.to_k', 'attn.to_q']\nlora_blocks = [0, 3]\n")
    cfg = config_from([*REQUIRED, "--config", str(toml)])
    assert cfg.target_layers == ["attn.to_k", "attn.to_q"]
    assert cfg.target_blocks == [0, 3]


def test_choice_values_in_toml_are_case_insensitive_like_flags(tmp_path):
    toml = write(tmp_path / "run.toml", 'optimizer = "AdamW"\nmixed_precision = "BF16"\n')
    cfg = config_from([*REQUIRED, "--config", str(toml)])
    assert (cfg.optimizer, cfg.mixed_precision) == ("adamw", "bf16")


def test_missing_config_file_and_invalid_toml(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    with pytest.raises(UserError, match="does not exist"):
        config_from([*REQUIRED, "--config", str(missing)])
    bad = write(tmp_path / "bad.toml", "rank = = 4\n")
    rc = main(["train", *REQUIRED, "--config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err
    assert "Traceback" not in err


# ---- flags -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["AdamW", "ADAMW", "adamw"])
def test_optimizer_case_insensitive(spelling):
    assert config_from([*REQUIRED, "--optimizer", spelling]).optimizer == "adamw"


def test_prodigy_spelling_and_8bit_alias():
    assert config_from([*REQUIRED, "--optimizer", "Prodigy"]).optimizer_name == "prodigy"
    assert config_from([*REQUIRED, "--use_8bit_adam"]).optimizer_name == "adamw8bit"


def test_lora_alpha_defaults_to_rank():
    cfg = config_from([*REQUIRED, "--rank", "16"])
    assert cfg.lora_alpha is None and cfg.alpha == 16
    assert config_from([*REQUIRED, "--rank", "16", "--lora_alpha", "8"]).alpha == 8
    assert TrainConfig().alpha == TrainConfig().rank == 4


def test_train_help_lists_every_setting_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    actions = {a.dest: a for a in train_parser()._actions}
    for name, f in FIELDS.items():
        assert f"--{name}" in text, name
        action = actions[name]
        assert f"--{name}" in action.option_strings
        described = (action.help or "").split("[default:")[0].strip()
        assert described, f"--{name} has no help text"
        if f.type.startswith("bool"):
            assert f"--no-{name}" in text, name
    assert "--config" in text


# ---- validate() --------------------------------------------------------------------------------------------

BASE = {"pretrained_model_name_or_path": "some/model", "instance_data_dir": "photos"}

RULES = [
    ({"pretrained_model_name_or_path": None}, "--pretrained_model_name_or_path is required"),
    ({"instance_data_dir": None}, "exactly one of --instance_data_dir and --dataset_name"),
    ({"dataset_name": "x/y"}, "exactly one of --instance_data_dir and --dataset_name"),
    ({"lr_scheduler": "cosine_annealing"}, "--lr_scheduler 'cosine_annealing' is not one of"),
    ({"weighting_scheme": "uniform"}, "--weighting_scheme"),
    ({"optimizer": "sgd"}, "--optimizer 'sgd'"),
    ({"mixed_precision": "fp8"}, "--mixed_precision"),
    ({"t5_precision": "fp8"}, "--t5_precision"),
    ({"report_to": "comet_ml"}, "--report_to"),
    ({"use_8bit_adam": True, "optimizer": "prodigy"}, "--use_8bit_adam conflicts with --optimizer prodigy"),
    ({"resolution": 100}, "--resolution 100 must be a positive multiple of 16"),
    ({"resolution": 0}, "--resolution 0"),
    ({"resolution": 8}, "--resolution 8"),
    *[
        ({name: 0}, f"--{name} must be at least 1")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "rank",
            "repeats",
            "num_train_epochs",
            "checkpointing_steps",
            "num_inference_steps",
            "sample_batch_size",
            "logging_steps",
        )
    ],
    ({"max_train_steps": 0}, "--max_train_steps must be at least 1"),
    ({"max_sequence_length": 0}, "--max_sequence_length must be between 1 and 512"),
    ({"max_sequence_length": 513}, "--max_sequence_length must be between 1 and 512"),
    ({"learning_rate": 0.0}, "--learning_rate must be positive"),
    ({"learning_rate": -1e-4}, "--learning_rate must be positive"),
    ({"lora_alpha": 0}, "--lora_alpha must be positive"),
    ({"lora_dropout": 1.0}, "--lora_dropout must be in [0, 1)"),
    ({"lora_dropout": -0.1}, "--lora_dropout must be in [0, 1)"),
    ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit must be at least 1"),
    ({"validation_steps": 0}, "--validation_steps must be at least 1"),
    ({"validation_epochs": 0}, "--validation_epochs must be at least 1"),
    ({"num_validation_images": 0}, "--num_validation_images must be at least 1"),
    ({"precondition_outputs": 2}, "--precondition_outputs must be 0 or 1"),
    ({"lora_blocks": "0,a"}, "--lora_blocks '0,a' must be comma-separated block numbers"),
    ({"lora_blocks": "1,-2"}, "--lora_blocks must be non-negative"),
    *[
        pytest.param(
            override,
            message,
            id=",".join(f"{k}={v}" for k, v in override.items()),
            marks=pytest.mark.skipif(not set(override) <= set(FIELDS), reason="setting not in this version"),
        )
        for override, message in (
            ({"max_vram": 0.0}, "--max_vram must be positive"),
            ({"blocks_to_swap": -1}, "--blocks_to_swap must be 0 or more"),
            ({"checkpoint_blocks": -1}, "--checkpoint_blocks must be 0 or more"),
            ({"base_precision": "nf4", "blocks_to_swap": 2}, "--blocks_to_swap cannot move NF4 weights"),
            ({"base_precision": "fp4"}, "--base_precision"),
            ({"swap_dtype": "fp8", "base_precision": "fp8"}, "--swap_dtype fp8 quantises a bf16 base's swapped"),
            ({"swap_dtype": "fp8", "blocks_to_swap": 0}, "--swap_dtype fp8 applies to swapped blocks"),
            ({"swap_dtype": "fp8", "lora_type": "dora"}, "--lora_type dora reads the base weights when it is added"),
            ({"swap_dtype": "int8"}, "--swap_dtype"),
        )
    ],
    ({"with_prior_preservation": True, "class_prompt": "a dog"}, "needs --class_data_dir"),
    ({"with_prior_preservation": True, "class_data_dir": "class"}, "needs --class_prompt"),
    (
        {"with_prior_preservation": True, "class_data_dir": "class", "class_prompt": "a dog", "num_class_images": 0},
        "--num_class_images must be at least 1",
    ),
]


def _as_param(rule) -> object:
    if type(rule) is tuple:  # pytest.param is a tuple subclass: those pass through
        override, message = rule
        return pytest.param(override, message, id=",".join(f"{k}={v}" for k, v in override.items()))
    return rule


@pytest.mark.parametrize(("override", "message"), [_as_param(r) for r in RULES])
def test_validate_rule(override, message):
    with pytest.raises(UserError) as e:
        validate(TrainConfig(**{**BASE, **override}))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_validate_accepts_the_base_and_edge_values():
    validate(TrainConfig(**BASE))
    validate(TrainConfig(**BASE, resolution=16, max_sequence_length=512, lora_dropout=0.0, lora_blocks="0, 3,"))
    validate(TrainConfig(pretrained_model_name_or_path="m", dataset_name="x/y", precondition_outputs=0))
    # prior preservation settings are only checked when it is on
    validate(TrainConfig(**BASE, num_class_images=0))


def test_validate_error_reaches_the_cli_as_one_line(capsys):
    rc = main(["train", *REQUIRED, "--lora_dropout", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: --lora_dropout must be in [0, 1), got 1.5\n"


def test_all_settings_have_flag_metadata():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(FIELDS)
    for f in dataclasses.fields(TrainConfig):
        assert str(f.metadata.get("help", "")).strip(), f.name
        assert str(f.metadata.get("group", "")).strip(), f.name


def test_settings_error_prints_nothing_on_stdout():
    """A settings error prints only the one stderr line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *REQUIRED, "--resolution", "100"])
    assert rc == 2 and out.getvalue() == ""
    assert err.getvalue().startswith("error: --resolution 100")
