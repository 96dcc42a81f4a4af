import json

import pytest

import config
from config import ConfigError, parse_overrides


def test_defaults_are_valid_and_untouched_without_overrides():
    assert parse_overrides([]) == config.DEFAULTS


def test_values_take_the_type_of_their_default():
    cfg = parse_overrides(["lr=1e-3", "max_steps=7", "overwrite=yes", "run=abc", "jitter=0", "resume=auto"])
    assert cfg["lr"] == 1e-3 and isinstance(cfg["lr"], float)
    assert cfg["max_steps"] == 7 and isinstance(cfg["max_steps"], int)
    assert cfg["overwrite"] is True and cfg["run"] == "abc" and cfg["jitter"] == 0.0 and cfg["resume"] == "auto"


@pytest.mark.parametrize("arg, fragment", [
    ("bogus=1", "unknown key 'bogus'"),
    ("lr=fast", "lr='fast': expected float"),
    ("max_steps=1.5", "expected int"),
    ("overwrite=maybe", "expected true or false"),
    ("resume=yes", "expected one of never, auto"),
    ("bad_files=ignore", "expected one of error, skip"),
    ("batch_size=0", "must be positive"),
    ("lr=-1e-4", "must be positive"),
    ("num_workers=-2", "must be -1 (auto) or more"),
    ("seed=-1", "must not be negative"),
    ("model=vgg", "expected one of basic, residual"),
    ("degradation=lanczos", "expected one of bilinear, bicubic, nearest"),
    ("device=tpu", "expected auto, cpu"),
    ("run=../escape", "plain folder name"),
    ("lr", "expected key=value"),
    ("loss=l3", "expected one of l1, l2"),
    ("loss_border=-1", "must not be negative"),
    ("loss_channels=cbcr", "expected one of rgb, y"),
    ("scale_augment=0.9,1.2", "expected different factors between 0 and 1"),
    ("scale_augment=half", "expected different factors between 0 and 1"),
    ("scale_augment=0.9,0.90", "expected different factors between 0 and 1"),
    ("lr=nan", "lr='nan': expected a number"),
    ("ema=1", "ema=1.0: must be in [0, 1)"),
    ("ema=-0.5", "ema=-0.5: must be in [0, 1)"),
    ("jitter=0.6", "jitter=0.6: must be in [0, 0.5]"),
    ("lr_min=1", "lr_min=1.0 is above lr=0.0001"),
    ("run=.hidden", "plain folder name"),
    ("device=cuda0", "expected auto, cpu, cuda or cuda:N"),
    ("device=cuda:x", "expected auto, cpu, cuda or cuda:N"),
    ("device=cuda:²", "expected auto, cpu, cuda or cuda:N"),
])
def test_bad_overrides_give_one_line_errors(arg, fragment):
    with pytest.raises(ConfigError) as error:
        parse_overrides([arg])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_every_device_form_is_accepted():
    assert [parse_overrides([f"device={d}"])["device"] for d in ("auto", "cpu", "cuda", "cuda:1")] == [
        "auto", "cpu", "cuda", "cuda:1"]


def test_training_needs_a_patch_the_scale_divides_but_evaluation_does_not():
    cfg = parse_overrides(["patch_size=63"])
    with pytest.raises(ConfigError, match="patch_size=63 is not divisible by scale=2"):
        config.validate_training(cfg)
    with pytest.raises(SystemExit, match="config error: patch_size=63 is not divisible"):
        config.from_argv(["patch_size=63"], training=True)
    config.validate_training(parse_overrides(["scale=3", "patch_size=63"]))


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: run, runs_dir"):
        parse_overrides(["learning_rate=1"])


def test_from_argv_exits_with_the_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        config.from_argv(["bogus=1"])
    assert str(exit_.value).startswith("config error: unknown key 'bogus'")


def test_a_key_of_another_script_is_refused_with_the_scripts_own_keys():
    with pytest.raises(SystemExit) as exit_:
        config.from_argv(["input=a.png", "out=b"], ("checkpoint", "upscale", "reading", "system"))  # upscale.py
    message = str(exit_.value)
    assert message.startswith("config error: out= is not a setting of this script (did you mean output=?); its keys:")
    assert "tile" in message and "protocol" not in message and "\n" not in message
    assert config.from_argv(["num_blocks=3", "scale=4"], ("model", "scale"))["scale"] == 4  # a single key
    with pytest.raises(SystemExit, match="not a setting of this script; its keys: model, num_blocks, channels, scale$"):
        config.from_argv(["gan=true"], ("model", "scale"))


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'; valid keys"):  # nothing close enough
        parse_overrides(["learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'max_step' \(did you mean max_steps=\?\)"):
        parse_overrides(["max_step=10"])


def test_save_writes_the_resolved_config(tmp_path):
    cfg = parse_overrides(["lr=0.001"])
    path = config.save(cfg, tmp_path / "run")
    assert json.loads(open(path).read()) == cfg


def test_training_refuses_a_loss_border_that_leaves_no_pixel_and_an_l2_gan():
    config.validate_training(parse_overrides(["patch_size=64", "loss_border=31"]))
    with pytest.raises(ConfigError, match="loss_border=32 leaves no pixel of the 64x64 crop"):
        config.validate_training(parse_overrides(["patch_size=64", "loss_border=32"]))
    with pytest.raises(ConfigError, match="loss=l2 loss_channels=rgb with gan=true"):
        config.validate_training(parse_overrides(["gan=true", "loss=l2"]))
    with pytest.raises(ConfigError, match="loss=l1 loss_channels=y with gan=true"):
        config.validate_training(parse_overrides(["gan=true", "loss_channels=y"]))
