"""A method, a data set and an encoder are each one new file: written here outside the package,
named in $SELFSUP_PLUGINS, and run through ``selfsup run`` with options of their own."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from selfsup import plugins
from selfsup.cli import build_parser

METHOD = '''
from dataclasses import dataclass

from selfsup.config import Range, setting
from selfsup.losses import nt_xent
from selfsup.methods import Method, register_method


@dataclass(frozen=True)
class OffsetSettings:
    loss_offset: float = setting(0.0, "added to the loss", Range(0, 1000))


@register_method("offset_simclr")
class OffsetSimCLR(Method):
    Settings = OffsetSettings
    progress_free = True

    def loss(self, v, progress):
        b = v.shape[0] // 2
        z = self.net(v)
        return nt_xent(z[:b], z[b:], 0.5) + self.settings.loss_offset
'''

DATASET = '''
from dataclasses import dataclass

import torch

from selfsup.config import Range, setting
from selfsup.data import ImageData
from selfsup.datasets import register_dataset


@dataclass(frozen=True)
class BlobSettings:
    blob_images: int = setting(64, "images generated", Range(8, 10000))


@register_dataset("blobs", settings=BlobSettings, folder=False)
def blobs(req, settings):
    g = torch.Generator().manual_seed(0)
    n, side = settings.blob_images, req.image_size or 16
    y = torch.arange(n) % 4
    x = torch.randint(0, 120, (n, 3, side, side), generator=g, dtype=torch.uint8)
    x[:, :, :, : 4] += (60 * y).to(torch.uint8).view(n, 1, 1, 1)  # learnable: a band per class
    return ImageData(x, y, x[:32].clone(), y[:32].clone(), ["a", "b", "c", "d"], "blobs")
'''

ENCODER = '''
from dataclasses import dataclass

from torch import nn

from selfsup.config import Range, setting
from selfsup.models import Encoder, register


@dataclass(frozen=True)
class TinySettings:
    tiny_features: int = setting(24, "feature width", Range(1, 512))


class Tiny(Encoder):
    def __init__(self, width, features):
        super().__init__()
        self.feature_dim = features
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, features))

    def forward(self, x):
        return self.net(x)


@register("tiny", settings=TinySettings)
def tiny(width, settings):
    return Tiny(width, settings.tiny_features)
'''

# Views of two sizes (multi-crop): two global views and two local ones at half the side.
MULTI_CROP = '''
import dataclasses

from selfsup.augment import augment, normalize_into
from selfsup.losses import nt_xent
from selfsup.methods import Method, register_method


@register_method("two_sizes")
class TwoSizes(Method):
    progress_free = True

    @classmethod
    def view_sizes(cls, cfg, side):
        return [(side, 2), (side // 2, 2)]

    def views(self, x, gen, shape=None):
        small = dataclasses.replace(self.aug, out_size=self.aug.out_size // 2)
        return [normalize_into(augment(x, p, gen, views=2, shape=shape), self.mean, self.std,
                               self.mem) for p in (self.aug, small)]

    def pair_views(self, x, gen, shape=None):
        v = self.views(x, gen, shape)[0]
        return v[:len(x)], v[len(x):]

    def loss(self, v, progress):
        glob, local = v
        b = glob.shape[0] // 2
        zg, zl = self.net(glob), self.net(local)
        return nt_xent(zg[:b], zg[b:], 0.5) + nt_xent(zl[:b], zg[b:], 0.5)
'''


def _plugins(tmp_path, **modules):
    paths = []
    for name, text in modules.items():
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(text))
        paths.append(str(path))
    return dict(os.environ, SELFSUP_PLUGINS=",".join(paths))


def _selfsup(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "selfsup", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_method_a_data_set_and_an_encoder_each_from_one_new_file(tmp_path):
    env = _plugins(tmp_path, my_method=METHOD, my_dataset=DATASET, my_encoder=ENCODER)
    helped = _selfsup("run", "--help", env=env, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for flag in ("--loss-offset", "--blob-images", "--tiny-features"):
        assert flag in helped.stdout
    assert "offset_simclr" in helped.stdout and "blobs" in helped.stdout  # the choices
    assert "--loss-offset" not in build_parser().format_help()  # the plugin's (not loaded here)

    done = _selfsup("run", "--dataset", "blobs", "--blob-images", "96", "--method",
                    "offset_simclr", "--loss-offset", "100", "--model", "tiny", "--width", "8",
                    "--tiny-features", "24", "--epochs", "2", "--batch-size", "32",
                    "--tsne-points", "0", "--no-progress", "--threads", "2", "--name", "p",
                    env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "p"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["method"], cfg["dataset"], cfg["model"]) == ("offset_simclr", "blobs", "tiny")
    assert (cfg["loss_offset"], cfg["blob_images"], cfg["tiny_features"]) == (100.0, 96, 24)
    losses = np.load(run / "loss.npy")
    assert len(losses) == 2 * (96 // 32) and (losses > 100).all() and (losses < 110).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pretrain_size"] == 96
    assert np.load(run / "train_emb.npy").shape == (96, 24)


@pytest.mark.slow
def test_a_method_of_views_of_two_sizes_runs_with_monitors_checkpoints_and_resume(tmp_path):
    env = _plugins(tmp_path, multi_crop=MULTI_CROP)
    common = ["--dataset", "digits", "--method", "two_sizes", "--width", "8", "--batch-size",
              "128", "--knn-every", "1", "--no-progress", "--threads", "2"]
    first = _selfsup("pretrain", *common, "--epochs", "1", "--name", "m", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    more = _selfsup("pretrain", *common, "--epochs", "2", "--resume", "runs/m", env=env,
                    cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "m" / "metrics.json").read_text())
    steps = 2 * (1437 // 128)
    assert len(np.load(tmp_path / "runs" / "m" / "loss.npy")) == steps
    assert [e["epoch"] for e in metrics["quality_history"]] == [0, 1, 2]
    assert [e["epoch"] for e in metrics["knn_history"]] == [0, 1, 2]


@pytest.mark.parametrize("entry", ["no_such_module_here", "missing.py"])
def test_a_plugin_that_cannot_be_imported_is_named(monkeypatch, entry):
    monkeypatch.setenv("SELFSUP_PLUGINS", entry)
    with pytest.raises(ImportError, match=f"SELFSUP_PLUGINS: cannot import {entry}"):
        plugins.load()
