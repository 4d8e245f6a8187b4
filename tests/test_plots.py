from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup import plots


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


@pytest.mark.slow
def test_each_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    plots.loss_curve(np.linspace(5, 3, 120) + rng.normal(0, 0.05, 120), tmp_path / "l.png", 12,
                     (np.log(511), "log(2N-1): chance level"))
    cm = rng.integers(0, 20, (4, 4))
    plots.confusion(cm, ["a", "b", "c", "d"], tmp_path / "c.png", "probe")
    f, y = rng.normal(size=(90, 6)), np.repeat(np.arange(3), 30)
    plots.pca_map(f, y, ["x", "y", "z"], tmp_path / "p.png")
    plots.tsne_map(f, y, ["x", "y", "z"], tmp_path / "t.png", points=60)
    plots.pca_map(f, None, [], tmp_path / "p2.png")
    imgs = rng.random((3, 8, 8, 3))
    plots.augmentation_grid(imgs, imgs, imgs, tmp_path / "a.png")
    for name in ("l", "c", "p", "t", "p2", "a"):
        _png_ok(tmp_path / f"{name}.png")
    assert not list(tmp_path.glob(".*tmp"))


def test_subsample_is_stratified():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = plots.subsample(y, len(y), 40)
    assert np.bincount(y[idx]).tolist() == [10, 10, 10, 10]
    assert len(plots.subsample(None, 10, 40)) == 10


@pytest.mark.slow
def test_many_classes_give_a_readable_page(tmp_path):
    """CIFAR-100's 100 classes: the confusion matrix stays a page (at most 25 names per axis)
    and the maps use a colour scale, not a 100-entry legend."""
    n = 100
    classes = [f"class{i}" for i in range(n)]
    cm = np.random.default_rng(0).integers(0, 9, (n, n))
    img = Image.open(plots.confusion(cm, classes, tmp_path / "c.png", "t"))
    assert img.size[0] <= 3000 and img.size[1] <= 1500
    xy = np.random.default_rng(1).normal(size=(300, 2))
    path = plots._scatter(xy, np.arange(300) % n, classes, tmp_path / "s.png", "t", "x", "y")
    assert Image.open(path).size[0] < 1200


def test_each_method_draws_its_own_loss_name_and_chance_level(tmp_path, monkeypatch):
    """SimCLR: NT-Xent and log(2N-1) (with --decoupled, DCL and log(2(N-1))); MoCo: InfoNCE
    over the queue and log(K+1) (8.32 for a 4,096 queue); BYOL: its own loss and no chance line
    (its loss has none)."""
    from selfsup.config import make_config
    from selfsup.methods import METHODS

    drawn = {}

    def keep(fig, path):
        ax = fig.axes[0]
        drawn[Path(path).stem] = (ax.get_title(), [ln.get_label() for ln in ax.lines],
                                  [ln.get_ydata()[0] for ln in ax.lines])
        plots.plt.close(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_close_and_save", keep)
    for name, over in (("simclr", {}), ("moco", {}), ("byol", {}), ("dcl", {"decoupled": True})):
        method = "simclr" if name == "dcl" else name
        cfg = make_config(None, {"method": method, "queue_size": 4096, **over})
        m = METHODS[method]
        plots.loss_curve(np.linspace(5, 3, 120), tmp_path / f"{name}.png", 12,
                         m.chance_loss(cfg, 256), loss_name=m.loss_title(cfg))
    assert drawn["simclr"][0] == "Pretraining loss (NT-Xent)"
    assert "log(2N-1): chance level" in drawn["simclr"][1]
    assert np.isclose(drawn["simclr"][2][-1], np.log(511))
    assert drawn["dcl"][0] == "Pretraining loss (DCL (decoupled NT-Xent))"  # --decoupled
    assert "log(2(N-1)): chance level (DCL)" in drawn["dcl"][1]
    assert np.isclose(drawn["dcl"][2][-1], np.log(510))
    assert drawn["moco"][0] == "Pretraining loss (InfoNCE over the queue)"
    assert "log(K+1): chance level" in drawn["moco"][1]
    assert np.isclose(drawn["moco"][2][-1], np.log(4097))  # 8.32
    assert "NT-Xent" not in drawn["byol"][0] and "BYOL" in drawn["byol"][0]
    assert not any("chance" in label for label in drawn["byol"][1])
