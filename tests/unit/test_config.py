"""Config: defaults, every shipped YAML, precedence, and every way of getting it wrong."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading

import pytest

from conftest import REPO
from train.config import Config, ConfigError, allowed, load_config
from train.plan import lr_at, plan_of

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_default_yaml_is_the_reference_recipe_and_the_defaults():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg == Config(), "configs/default.yaml and the dataclass defaults must not drift apart"
    assert (cfg.noise.factor, cfg.train.lr, cfg.train.per_device_batch_size, cfg.train.epochs) == (0.5, 1e-3, 20, 20)
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_accumulation_steps == 1
    assert cfg.model.name == "conv_denoiser"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.name.startswith("images_"):  # the recipes for your pictures take the folders on the command line
        with pytest.raises(ConfigError, match="data.train_dir' must name a folder of pictures"):
            load_config(path)
        assert load_config(path, ["data.train_dir=a", "data.test_dir=b"]).data.dataset == "images"
        return
    assert isinstance(load_config(path), Config)


def test_overrides_beat_yaml_and_parse_as_yaml_scalars(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  lr: 0.01\n")
    cfg = load_config(f, ["train.epochs=3", "data.download=false", "train.lr=1e-4", "output_dir=/x/y",
                         "train.mixed_precision=no"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.data.download is False
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.output_dir == "/x/y" and cfg.train.mixed_precision == "no"  # YAML 1.1 would read False
    assert load_config(f).train.epochs == 5  # YAML beats defaults


def test_ints_are_accepted_for_floats():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


BAD = [
    # (yaml text or None, overrides, words the one-line message must contain)
    ("train:\n  epochs: [1, 2\n", [], ["not valid YAML", "line"]),
    ("trian:\n  epochs: 2\n", [], ["unknown config key 'trian'", "train"]),
    ("train:\n  epoch: 2\n", [], ["unknown config key 'train.epoch'", "train.epochs"]),
    (None, ["train.lr=fast"], ["train.lr", "must be float", "fast"]),
    (None, ["train.lr=.inf"], ["train.lr", "finite"]),
    (None, ["noise.factor=nan"], ["noise.factor", "finite"]),
    (None, ["train.epochs=2.5"], ["train.epochs", "must be int"]),
    (None, ["train.epochs=true"], ["train.epochs", "must be int"]),
    (None, ["train.seed=9223372036854775808"], ["train.seed", "must fit in 64 bits"]),  # torch's seeds overflowed
    (None, ["eval.per_device_batch_size=100000000000000000000000"], ["eval.per_device_batch_size", "64 bits"]),
    (None, ["data.download_timeout_s=1e300"], ["data.download_timeout_s", "in (0, 86400]"]),
    (None, ["data.download=maybe"], ["data.download", "must be bool"]),
    (None, ["train.lr=-0.1"], ["train.lr", "> 0"]),
    (None, ["train.per_device_batch_size=0"], ["train.per_device_batch_size", ">= 1"]),
    (None, ["noise.factor=-1"], ["noise.factor", ">= 0"]),
    (None, ["train.mixed_precision=fp8"], ["train.mixed_precision", "bf16"]),
    (None, ["logging.wandb_mode=loud"], ["logging.wandb_mode", "offline"]),
    (None, ["model.name=unet9000"], ["model.name", "conv_denoiser"]),
    (None, ["train=3"], ["'train' is a section"]),
    (None, ["epochs"], ["section.key=value"]),
    (None, ["train.epochs"], ["section.key=value"]),
    ("- a\n- b\n", [], ["must be a mapping"]),
]


@pytest.mark.parametrize("text,overrides,words", BAD, ids=[" ".join(b[1]) or b[0][:12] for b in BAD])
def test_bad_config_fails_naming_the_problem(tmp_path, text, overrides, words):
    path = None
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_missing_or_unreadable_config_file(tmp_path):
    for path in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(ConfigError, match="not found: pass an existing file to --config"):
            load_config(path)
    with socket.socket(socket.AF_UNIX) as sock:  # exists, yet opening it fails (ENXIO)
        sock.bind(str(tmp_path / "socket.yaml"))
        with pytest.raises(ConfigError, match="cannot be read .*: pass a readable file"):
            load_config(tmp_path / "socket.yaml")


def test_a_config_can_come_through_a_pipe(tmp_path):
    fifo = tmp_path / "config.yaml"  # what bash's --config <(...) passes
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("train:\n  lr: 0.5\n",))
    writer.start()
    assert load_config(fifo).train.lr == 0.5
    writer.join()


def test_noise_specs_for_training_and_evaluation():
    from train.noise import NoiseSpec

    cfg = load_config(None, ["noise.kind=salt_pepper", "noise.factor=0.3"])
    assert cfg.noise.train_spec() == cfg.noise.eval_spec() == NoiseSpec("salt_pepper", 0.3, 0.3)
    cfg = load_config(None, ["noise.train_factor_min=0.2", "noise.train_factor_max=0.8"])
    assert cfg.noise.train_spec() == NoiseSpec("gaussian", 0.2, 0.8)
    assert cfg.noise.eval_spec() == NoiseSpec("gaussian", 0.5, 0.5)  # evaluation stays at the fixed level


@pytest.mark.parametrize("overrides,words", [
    (["noise.kind=speckle"], ["noise.kind", "gaussian", "salt_pepper"]),
    (["noise.kind=salt_pepper", "noise.factor=1.5"], ["noise.factor", "<= 1", "fraction"]),
    (["noise.train_factor_min=0.6", "noise.train_factor_max=0.4"], ["noise.train_factor_min", "<="]),
    (["model.unet.levels=4"], ["model.unet.levels", "in [1, 3]"]),
    (["model.unet.channels=0"], ["model.unet.channels", ">= 1"]),
    (["model.unet.top_channels=-2"], ["model.unet.top_channels", ">= 0"]),
    (["train.lr_schedule=linear"], ["train.lr_schedule", "cosine"]),
    (["perf.compile_mode=max-autotune"], ["perf.compile_mode", "max-autotune-no-cudagraphs"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps", ">= 0"]),
    (["eval.min_output_std=-1"], ["eval.min_output_std", ">= 0"]),
])
def test_issue7_keys_fail_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def _leaves(obj, prefix=""):
    """(dotted key, field, default) of every setting of the config `obj`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


@pytest.mark.parametrize("key,bounds", [(k, dict(f.metadata)) for k, f, _ in _leaves(Config()) if f.metadata],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_declared_bound_refuses_the_value_past_it(key, bounds):
    """Just past each bound is refused in one line naming the key; the bound itself is accepted."""
    outside = [bounds["low"] - 1] if "low" in bounds else []
    outside += [bounds["high"] + 1] if "high" in bounds else []
    outside += [bounds["above"]] if "above" in bounds else []
    outside += ["not-a-choice"] if "choices" in bounds and isinstance(bounds["choices"][0], str) else []
    outside += [max(bounds["choices"]) + 1] if "choices" in bounds and isinstance(bounds["choices"][0], int) else []
    assert outside
    for value in outside:
        with pytest.raises(ConfigError, match=f"config key '{key}' must be ") as err:
            load_config(None, [f"{key}={value}"])
        assert "\n" not in str(err.value)
    for edge in [bounds[k] for k in ("low", "high") if k in bounds]:  # may still break a rule between keys
        try:
            load_config(None, [f"{key}={edge}"])
        except ConfigError as e:
            assert f"'{key}' must be {allowed(bounds)}" not in str(e), str(e)


def test_mnist_sample_limits_and_timeout_are_checked():
    # These checks once sat after a return, unreachable: -1 samples were taken as "all".
    for override in ("data.train_samples=-1", "data.test_samples=-3", "data.download_timeout_s=0"):
        with pytest.raises(ConfigError, match=f"config key '{override.split('=')[0]}'"):
            load_config(None, [override])


def test_lr_schedule_warms_up_then_follows_a_cosine_to_zero():
    tc = load_config(None, ["train.lr_schedule=cosine", "train.warmup_steps=9"]).train
    lrs = [lr_at(tc, step, 109, 1.0) for step in range(109)]
    assert lrs[:9] == pytest.approx([(s + 1) / 10 for s in range(9)])  # linear warm-up, never 0
    assert lrs[9] == 1.0 and lrs[59] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # decreasing after the warm-up
    const = load_config(None).train
    assert {lr_at(const, s, 109, 0.3) for s in range(109)} == {0.3}


def test_the_configs_model_names_are_the_models_model_py_builds():
    from train.config import MODEL_NAMES
    from train.model import MODELS

    assert MODEL_NAMES == tuple(MODELS)


def test_a_key_of_earlier_configs_loads_when_off_and_says_where_it_went_when_on(tmp_path):
    saved = tmp_path / "config.yaml"  # as a run of an earlier version wrote it
    saved.write_text("perf:\n  channels_last: true\n  fuse_first_block: false\nlogging:\n  trackers: []\n")
    assert load_config(saved).perf.channels_last
    for on in ("perf.fuse_first_block=true", "logging.trackers=[tensorboard]"):
        key = on.split("=")[0]
        with pytest.raises(ConfigError, match=f"'{key}' was removed .*delete it from the config"):
            load_config(None, [on])


def test_the_configuration_page_is_generated_from_every_keys_docstring():
    from train.config import reference

    page = reference()  # a key without a docstring fails here
    assert (REPO / "docs" / "configuration.md").read_text() == page, "run python -m train.config > docs/configuration.md"
    keys = [key for key, _, _ in _leaves(Config())]
    rows = [line.split("|")[1].strip(" `") for line in page.splitlines() if line.startswith("| `")]
    assert rows == keys
    assert "| `train.lr` | `0.001` | > 0 | Adam learning rate" in page and "| `data.root` | `data` |  |" in page


def test_a_global_batch_size_fixes_the_batch_on_any_world_size_that_divides_it():
    tc = load_config(None, ["train.global_batch_size=24", "train.gradient_accumulation_steps=2",
                            "train.lr_scaling=linear"]).train
    for processes, per_device in ((1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)):
        plan = plan_of(tc, processes)
        assert (plan.per_device_batch_size, plan.global_batch, plan.global_micro_batch) == (per_device, 24, 12)
        assert plan.peak_lr == pytest.approx(1e-3 * 24 / 20)  # the same schedule on every world size
    for processes in (5, 24):  # 24 / (5 x 2) leaves a remainder; 24 / (24 x 2) is under one image
        with pytest.raises(ConfigError, match="train.global_batch_size' \\(24\\) does not split evenly"):
            plan_of(tc, processes)
    assert plan_of(load_config().train, 2).global_batch == 40  # unset: per device x processes, as before


def _alias_bomb(levels: int = 8) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ntrain: {{lr: *a{levels - 1}}}\n"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 1000
    with pytest.raises(ConfigError, match="more than 10,000 values once its aliases are expanded") as e:
        load_config(path)
    assert len(str(e.value)) < 300
    path.write_text("a: &a [*a]\n")  # an alias inside itself: a cycle
    with pytest.raises(ConfigError, match="alias that contains itself"):
        load_config(path)


def test_a_huge_config_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("train:\n" + "  # padding\n" * 30_000)  # 330 KB of comments
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)


def test_an_error_never_prints_a_whole_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train: {lr: [" + ", ".join(["1"] * 5000) + "]}\nnoise: {kind: '" + "g" * 100_000 + "'}\n")
    with pytest.raises(ConfigError, match="config key 'train.lr' must be float") as e:
        load_config(path)
    assert len(str(e.value)) < 200
    with pytest.raises(ConfigError, match="config key 'noise.kind' must be one of") as e:
        load_config(overrides=["noise.kind=" + "g" * 100_000])
    assert len(str(e.value)) < 200


def test_a_leading_tilde_in_a_path_is_the_home_folder(monkeypatch, tmp_path):
    # The shell leaves ~ alone in `output_dir=~/runs/a`: the run would make a folder named ~ here.
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(overrides=["output_dir=~/runs/a", "data.root=~/data", "checkpoint.resume=~/ckpt/step_00000010"])
    assert (cfg.output_dir, cfg.data.root) == (f"{tmp_path}/runs/a", f"{tmp_path}/data")
    assert cfg.checkpoint.resume == f"{tmp_path}/ckpt/step_00000010"
    cfg = load_config(overrides=["data.dataset=images", "model.name=unet", "data.train_dir=~/photos/train",
                                 "data.test_dir=~/photos/test"])
    assert (cfg.data.train_dir, cfg.data.test_dir) == (f"{tmp_path}/photos/train", f"{tmp_path}/photos/test")
    assert load_config(overrides=["checkpoint.resume=none"]).checkpoint.resume == "none"
    assert load_config().output_dir == "outputs/default"  # a path without ~ is left as it is
    from train import denoise, main

    assert main.parse_args(["--config=~/my.yaml"]).config == f"{tmp_path}/my.yaml"
    args = denoise.parse_args(["--checkpoint=~/runs/a", "--out=~/clean", "digit.png"])
    assert (args.checkpoint, args.out) == (f"{tmp_path}/runs/a", f"{tmp_path}/clean")
