import pytest

from selfsup.config import PRESETS, Config, config_from_dict, diff_keys, make_config
from selfsup.errors import ConfigError


def test_defaults_validate_and_roundtrip():
    cfg = make_config()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_preset_then_overrides():
    cfg = make_config("quick", {"epochs": "7"})
    assert cfg.epochs == 7 and cfg.width == PRESETS["quick"]["width"] and cfg.preset == "quick"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_valid(preset):
    make_config(preset)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown config key.*bach_size.*valid keys:.*batch_size"):
        config_from_dict({"bach_size": 4})


def test_unknown_preset_and_model_list_valid_names():
    with pytest.raises(ConfigError, match="valid presets: quick, cpu, gpu"):
        make_config("laptop")
    with pytest.raises(ConfigError, match="valid models:.*small_cnn.*resnet18"):
        make_config(None, {"model": "vgg"})


@pytest.mark.parametrize("key,value,msg", [
    ("batch_size", 1, r"--batch-size must be an integer in \[2, 65536\], got 1"),
    ("temperature", 0, r"--temperature must be a number in \[0.001, 100\]"),
    ("temperature", -1.0, r"--temperature must be a number in \[0.001, 100\]"),
    ("optimizer", "adam", "optimizer must be one of sgd, lars"),
    ("epochs", "ten", r"--epochs must be an integer in \[1, 1000000\], got ten"),
    ("lr", "nan", r"--lr must be a number in \(0, 100\], got nan"),
    ("flip_p", 1.5, r"--flip-p must be a number in \[0, 1\]"),
    ("crop_scale_min", 0.0, r"--crop-scale-min must be a number in \(0, 1\]"),
    ("channels_last", "maybe", "true or false"),
])
def test_invalid_values(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        make_config(None, {key: value})


def test_diff_keys_allows_epochs_only():
    a = Config()
    assert diff_keys(a, make_config(None, {"epochs": 99})) == []
    assert diff_keys(a, make_config(None, {"model": "resnet18", "width": 8})) == ["model", "width"]


def test_dataset_defaults_sit_under_preset_and_options():
    from selfsup.config import PLUGINS

    d = PLUGINS["dataset"]["digits"].defaults
    assert make_config(None, {"dataset": "digits"}).epochs == d["epochs"]
    assert make_config("quick", {"dataset": "digits"}).epochs == PRESETS["quick"]["epochs"]
    assert make_config(None, {"dataset": "digits", "epochs": 2}).epochs == 2
    assert make_config(None, {"dataset": "digits"}).flip_p == 0.0
    assert make_config().flip_p == 0.5


@pytest.mark.parametrize("budget", ["20", "5d", "-1m", "m"])
def test_bad_budget(budget):
    with pytest.raises(ConfigError, match="budget"):
        make_config(None, {"budget": budget})


def test_gpu_preset_is_the_published_cifar10_command():
    """The SimCLR authors' CIFAR-10 command: ResNet-18, batch 512, 1000 epochs, LARS, lr 1.0 per
    256 (linear scaling), weight decay 1e-6, temperature 0.5, jitter 0.5, no blur, 10 warm-up
    epochs."""
    cfg = make_config("gpu")
    assert (cfg.model, cfg.batch_size, cfg.epochs, cfg.optimizer) == ("resnet18", 512, 1000,
                                                                       "lars")
    assert (cfg.lr, cfg.weight_decay, cfg.options["temperature"]) == (1.0, 1e-6, 0.5)
    assert (cfg.jitter_strength, cfg.blur_p, cfg.warmup_epochs) == (0.5, 0.0, 10)
    assert cfg.lr * cfg.batch_size / 256 == 2.0  # the peak rate their linear scaling gives
