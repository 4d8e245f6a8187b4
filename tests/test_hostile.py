"""Hostile files, hostile names, hostile numbers: nothing is written outside the run folder, no
user file is overwritten, and every bad input ends in selfsup's own message, never a traceback.

Grouped by class of defect: run-folder confinement and data loss, images, runs on tiny or odd
data, option ranges (with a property-based test over every subcommand), files that are not what
they claim, signals and file modes.
"""

import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup import checkpoint, data, files, workflow
from selfsup.cli import build_parser, main
from selfsup.errors import CheckpointError, DataError
from tests.helpers import DIGITS_ARGS, file_tree, write_images

CHILD_ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
TINY = ["--width", "4", "--proj-hidden", "8", "--proj-dim", "4", "--epochs", "1",
        "--batch-size", "8", "--no-progress", "--knn-every", "0", "--threads", "2"]
DIGITS = DIGITS_ARGS


@pytest.fixture
def run(finished_run):
    """A finished digits run (pretrained, evaluated, plotted, reported)."""
    return finished_run


# --- run-folder confinement and data loss ----------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "..", ".", ".hidden", "a/b", "a\\b", "ABS",
                                  "x\ny", "x" * 300])
def test_run_name_is_a_name_never_a_path(tmp_path, capsys, name):
    if name == "ABS":
        name = str(tmp_path / "elsewhere")
    out = tmp_path / "base" / "runs"
    out.mkdir(parents=True)
    before = file_tree(tmp_path)
    assert main(["pretrain", *DIGITS, "--out-dir", str(out), "--name", name]) == 2
    err = capsys.readouterr().err
    assert "--name must be" in err and "Traceback" not in err
    assert file_tree(tmp_path) == before and not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["base"]


@pytest.mark.parametrize("contents", ["config", "checkpoint_like", "other"])
def test_existing_folder_that_is_not_this_run_is_never_written(tmp_path, capsys, contents):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    if contents == "config":
        (folder / "config.json").write_text('{"my": "own settings"}')
    elif contents == "checkpoint_like":
        (folder / "loss.npy").write_bytes(b"my data")
    else:
        (folder / "thesis.tex").write_text("years of work")
    before = file_tree(folder)
    assert main(["run", *DIGITS, "--out-dir", str(tmp_path / "runs"), "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "Traceback" not in err
    assert file_tree(folder) == before


def test_an_empty_folder_may_hold_a_new_run(tmp_path):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert main(["pretrain", *DIGITS, "--epochs", "1", "--out-dir", str(tmp_path / "runs"),
                 "--name", "empty"]) == 0
    assert (tmp_path / "runs" / "empty" / "encoder.pt").is_file()


def test_commands_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"my": "own settings"}')
    (folder / "metrics.json").write_text("{}")
    before = file_tree(folder)
    for cmd in (["report"], ["evaluate"], ["plot"], ["finetune"], ["label-efficiency"]):
        assert main([*cmd, str(folder)]) == 2
        err = capsys.readouterr().err
        assert "not a usable selfsup run folder" in err and "Traceback" not in err
    assert file_tree(folder) == before


@pytest.mark.slow
def test_embed_keeps_every_path_and_never_shares_an_output_name(run, tmp_path, capsys):
    from selfsup import load_encoder

    images = tmp_path / "imgs"
    write_images(images, 3, size=16)
    odd = ["new\nline.png", "tab\tand space .png", "semi;colon,comma.png", "quote\"'.png"]
    for i, name in enumerate(odd):
        write_images(tmp_path / "tmp", 1, size=16, seed=100 + i)
        (tmp_path / "tmp" / "000.png").rename(images / name)
    for bad in ("f.txt", "f", "f.json", str(tmp_path / "missing" / "f.npy"),
                str(run / "train_emb.npy"), str(run / "loss.npy")):
        assert main(["embed", str(run), "--images", str(images), "--out", bad]) == 2
        assert "--out" in capsys.readouterr().err
    out = tmp_path / "feats.npy"
    assert main(["embed", str(run), "--images", str(images), "--out", str(out)]) == 0
    feats = np.load(out)
    listing = json.loads((tmp_path / "feats.files.json").read_text())
    assert listing["rows"] == len(listing["files"]) == len(feats) == 7
    assert {Path(p).name for p in listing["files"]} >= set(odd)
    fx = load_encoder(run)
    for row, path in enumerate(listing["files"]):  # row i is the features of file i
        one, _ = data.decode_images([Path(path)], fx.image_size)
        np.testing.assert_allclose(feats[row], fx.embed(one)[0], rtol=1e-5, atol=1e-5)


def test_resume_keeps_the_record_and_adds_to_it(run, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(run, r)
    config_before = (r / "config.json").read_bytes()
    first = json.loads((r / "metrics.json").read_text())["pretrain"]
    assert main(["pretrain", "--resume", str(r), "--epochs", "2"]) == 0
    assert (r / "config.json").read_bytes() == config_before  # what was asked at the start
    m = json.loads((r / "metrics.json").read_text())
    (resumed,) = m["resumes"]
    assert resumed["changed"]["epochs"] == [1, 2]
    assert resumed["from_step"] == first["steps"] and resumed["to_step"] == 2 * first["steps"]
    assert m["pretrain"]["steps"] == 2 * first["steps"] and m["config"]["epochs"] == 2
    assert m["pretrain"]["images_per_s"] > 0
    assert m["pretrain"]["train_seconds"] > first["train_seconds"]
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(r)]) == 0  # nothing left to train: says so
    assert "nothing to train" in capsys.readouterr().out
    m2 = json.loads((r / "metrics.json").read_text())
    assert len(m2["resumes"]) == 2 and m2["resumes"][1]["changed"] == {}
    assert m2["pretrain"]["images_per_s"] == pytest.approx(m["pretrain"]["images_per_s"])
    assert (r / "config.json").read_bytes() == config_before


# --- images ------------------------------------------------------------------------------------


def _png(path: Path, width: int, height: int, depth: int, colour: int, rows: list[bytes]) -> None:
    """A PNG written chunk by chunk, so that it may declare any size and depth."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + r for r in rows)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour,
                                                  0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _bomb(path: Path) -> None:
    """~100 bytes declaring 30000 x 30000 pixels."""
    _png(path, 30000, 30000, 8, 2, [b"\x00" * 30])
    assert path.stat().st_size < 200


def test_decompression_bomb_is_a_bad_image_everywhere(run, tmp_path, capsys):
    from selfsup import load_encoder

    root = tmp_path / "imgs"
    write_images(root, 3, size=16)
    _bomb(root / "000_bomb.png")  # sorted first: it must not set the image size either
    with pytest.warns(UserWarning, match=r"1 unreadable image.*000_bomb.png.*pixel limit"):
        d = data.load_image_folder(root)
    assert d.train_x.shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match="000_bomb.png"):
        data.load_image_folder(root, bad_images="fail")
    with pytest.warns(UserWarning, match="000_bomb.png"):
        feats, paths = load_encoder(run).embed_folder(root)
    assert len(feats) == 3 and all("bomb" not in p.name for p in paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["embed", str(run), "--images", str(root), "--out",
                     str(tmp_path / "e.npy")]) == 0
    only = tmp_path / "only"
    only.mkdir()
    _bomb(only / "a.png")
    assert main(["pretrain", "--dataset", "folder", "--data-dir", str(only), *TINY,
                 "--out-dir", str(tmp_path / "runs"), "--name", "b"]) == 2
    err = capsys.readouterr().err
    assert "pixel limit" in err and "Traceback" not in err


def _rgb16_png(path: Path, rgb: tuple[int, int, int]) -> None:
    _png(path, 4, 4, 16, 2, [struct.pack(">HHH", *rgb) * 4] * 4)


def _modes():
    """(file name, writer, expected RGB of every pixel) for every kind of image Pillow opens."""
    from PIL import Image

    def save(mode, value, name, **kw):
        return lambda p: Image.new(mode, (4, 4), value).save(p / name, **kw)

    def palette(p):
        im = Image.new("P", (4, 4), 1)
        im.putpalette([255, 0, 0, 10, 200, 30] + [0] * 762)
        im.save(p / "p.png", transparency=0)

    def float_tif(p):
        Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(p / "f.tif")

    def float_255_tif(p):
        Image.fromarray(np.full((4, 4), 200.0, np.float32), "F").save(p / "f255.tif")

    def int32_tif(p):
        Image.fromarray(np.full((4, 4), 40000, np.int32), "I").save(p / "i32.tif")

    return [
        ("g16.png", lambda p: Image.fromarray(np.full((4, 4), 0x8000, np.uint16)).save(
            p / "g16.png"), (128, 128, 128)),
        ("rgb16.png", lambda p: _rgb16_png(p / "rgb16.png", (0xFFFF, 0x8000, 0x0100)),
         (255, 128, 1)),
        ("f.tif", float_tif, (128, 128, 128)),
        ("f255.tif", float_255_tif, (200, 200, 200)),
        ("i32.tif", int32_tif, (156, 156, 156)),
        ("i16.tif", save("I;16", 65535, "i16.tif"), (255, 255, 255)),
        ("b.png", save("1", 1, "b.png"), (255, 255, 255)),
        ("p.png", palette, (10, 200, 30)),
        ("cmyk.tif", save("CMYK", (255, 0, 0, 0), "cmyk.tif"), (0, 255, 255)),
        ("cmyk.jpg", save("CMYK", (255, 0, 0, 0), "cmyk.jpg", quality=100), (0, 255, 255)),
        ("la.png", save("LA", (77, 10), "la.png"), (77, 77, 77)),
        ("rgba.png", save("RGBA", (1, 2, 3, 0), "rgba.png"), (1, 2, 3)),
        ("grey.jpg", save("L", 90, "grey.jpg", quality=100), (90, 90, 90)),
        ("lab.tif", save("LAB", (136, 208, 195), "lab.tif"), (250, 3, 11)),
    ]


@pytest.mark.parametrize("name,write,expected", _modes(), ids=[m[0] for m in _modes()])
def test_every_image_mode_decodes_to_its_8_bit_rgb_values(tmp_path, name, write, expected):
    write(tmp_path)
    x, kept = data.decode_images([tmp_path / name], 4)
    assert kept == [0] and x.dtype == torch.uint8
    got = x[0].permute(1, 2, 0).reshape(-1, 3)
    assert (got - torch.tensor(expected)).abs().max() <= 2, (name, got[0].tolist())


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    im = Image.new("RGB", (8, 4), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    im.save(tmp_path / "o.png", exif=exif)
    x, _ = data.decode_images([tmp_path / "o.png"], 8)
    top, bottom = x[0, 0, :2].float().mean(), x[0, 0, -2:].float().mean()
    assert top > 200 and bottom < 50  # the white half is on top once turned upright


def _unreadable(path: Path, monkeypatch) -> None:
    """Make a folder unreadable: by its mode, and (for root, whom modes do not stop) by
    refusing to list it."""
    path.chmod(0)
    real = os.scandir

    def scandir(p="."):
        if Path(p).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    if os.geteuid() == 0:
        monkeypatch.setattr(data.os, "scandir", scandir)


def _labelled(root: Path) -> Path:
    for c, name in enumerate(["cat", "dog", "emu"]):
        write_images(root / "train" / name, 6, seed=c, color=c)
        write_images(root / "test" / name, 2, seed=10 + c, color=c)
    return root


def test_unreadable_folders_are_named(tmp_path, monkeypatch, capsys):
    root = _labelled(tmp_path / "imgs")
    try:
        _unreadable(root / "train" / "dog", monkeypatch)
        with pytest.warns(UserWarning) as rec:
            d = data.load_image_folder(root)
        said = " ".join(str(w.message) for w in rec)
        assert re.search(r"cannot be read.*train/dog", said)
        assert "images of dog are left out" in said  # its test images too
        assert d.classes == ["cat", "emu"] and len(d.test_x) == 4
        with pytest.raises(DataError, match=r"cannot be read.*train/dog"):
            data.load_image_folder(root, bad_images="fail")
        monkeypatch.undo()
        (root / "train" / "dog").chmod(0o755)
        _unreadable(root, monkeypatch)
        with pytest.raises(DataError, match="cannot be read"):
            data.load_image_folder(root)
        assert main(["pretrain", "--dataset", "folder", "--data-dir", str(root), *TINY,
                     "--out-dir", str(tmp_path / "runs"), "--name", "u"]) == 2
        err = capsys.readouterr().err
        assert "cannot be read" in err and "Traceback" not in err
    finally:
        for p in (root, root / "train" / "dog"):
            p.chmod(0o755)


def test_links_loops_and_special_files_never_hang_a_load(tmp_path):
    root = tmp_path / "imgs"
    write_images(root / "a", 3)
    (root / "a" / "loop").symlink_to(root)  # a folder that contains itself
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "pipe.png")  # opening it would wait for a writer forever
    with pytest.warns(UserWarning, match=r"cannot be read.*not a regular file"):
        d = data.load_image_folder(root)
    assert len(d.train_x) == 3
    with pytest.raises(DataError, match="pipe.png"):
        data.load_image_folder(root, bad_images="fail")


def test_empty_class_folders_and_a_missing_split_are_named(tmp_path):
    root = _labelled(tmp_path / "imgs")
    (root / "train" / "yak").mkdir()
    with pytest.warns(UserWarning, match=r"class folder.*train hold no images.*yak"):
        d = data.load_image_folder(root)
    assert d.classes == ["cat", "dog", "emu"] and d.labeled
    shutil.rmtree(root / "train" / "yak")
    for e in (root / "test" / "emu").iterdir():
        e.unlink()
    with pytest.warns(UserWarning, match=r"test hold no images.*emu"):
        d = data.load_image_folder(root)
    assert len(d.test_x) == 4
    (root / "train" / "README.txt").write_text("notes")
    with pytest.warns(UserWarning) as rec:
        data.load_image_folder(root)
    assert any(re.search(r"1 file\(s\) directly in .*train, outside any class", str(w.message))
               for w in rec)
    (root / "train" / "README.txt").unlink()
    shutil.rmtree(root / "test")
    with pytest.warns(UserWarning, match=r"has train/ with class folders but no test/"):
        d = data.load_image_folder(root)
    assert not d.labeled and len(d.train_x) == 18 + 0


# --- runs on tiny or odd data ----------------------------------------------------------------


def _tiny_folder(root: Path, classes: list[str], train: int, test: int, size: int = 12
                 ) -> Path:
    for c, name in enumerate(classes):
        write_images(root / "train" / name, train, size=size, seed=c, color=c)
        if test:
            write_images(root / "test" / name, test, size=size, seed=10 + c, color=c)
    return root


def _bytes_named_folder(root: Path) -> list[str]:
    """Class folders whose names hold a newline and bytes that are not UTF-8."""
    names = [b"caf\xe9", b"new\nline", b"ok"]
    for split, n in (("train", 12), ("test", 3)):
        for c, name in enumerate(names):
            d = os.fsdecode(os.path.join(os.fsencode(root / split), name))
            write_images(Path(d), n, seed=c + (10 if split == "test" else 0), color=c)
    return sorted(os.fsdecode(n) for n in names)


@pytest.mark.parametrize("case", ["one_test_image", "two_test_images", "markup_names",
                                  "undecodable_names", "tsne_0", "tsne_1"])
@pytest.mark.slow
def test_tiny_or_odd_data_finish_with_metrics_and_report(tmp_path, capsys, case):
    classes = {"markup_names": ["$a$b", "x$\\frac{1}{", "c$^$", "{d}"]}.get(case, ["a", "b"])
    extra = {"tsne_0": ["--tsne-points", "0"], "tsne_1": ["--tsne-points", "1"]}.get(case, [])
    if case == "one_test_image":
        _tiny_folder(tmp_path / "d", ["a"], 12, 1)
        classes = ["a"]
    elif case == "undecodable_names":
        classes = _bytes_named_folder(tmp_path / "d")
    else:
        _tiny_folder(tmp_path / "d", classes, 12, 1 if case == "two_test_images" else 3)
    assert main(["run", "--dataset", "folder", "--data-dir", str(tmp_path / "d"), *TINY, *extra,
                 "--out-dir", str(tmp_path / "runs"), "--name", "t"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    r = tmp_path / "runs" / "t"
    m = json.loads((r / "metrics.json").read_text())
    assert "linear_probe" in m and (r / "report.html").is_file() and (r / "loss.png").is_file()
    if case in ("markup_names", "undecodable_names"):
        assert m["classes"] == sorted(classes)
        assert all((r / f).is_file() for f in ("tsne.png", "pca.png", "confusion.png",
                                               "retrieval.png")), err
    if case.startswith("tsne") or case.endswith("image"):
        assert "no t-SNE map" in err or "no tsne figure" in err


def test_labels_reach_figures_literally():
    import matplotlib.pyplot as plt

    from selfsup.plots import literal_text

    @literal_text
    def draw():
        fig, ax = plt.subplots()
        t = ax.set_title("$x")
        ax.legend(handles=ax.plot([0, 1], label="\\frac{")[:1])
        fig.canvas.draw()  # markup would fail to parse here
        text = t.get_text()
        plt.close(fig)
        return text

    assert draw() == "$x"


@pytest.mark.parametrize("extra,size", [(["--view-size", "1"], 12), ([], 1), ([], 4)])
def test_views_too_small_for_the_encoder_are_refused_before_training(tmp_path, capsys, extra,
                                                                     size):
    _tiny_folder(tmp_path / "d", ["a", "b"], 6, 2, size=size)
    assert main(["run", "--dataset", "folder", "--data-dir", str(tmp_path / "d"), *TINY, *extra,
                 "--out-dir", str(tmp_path / "runs"), "--name", "v"]) == 2
    err = capsys.readouterr().err
    assert "too small for small_cnn, which needs at least 8x8 px" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "v").exists()


def test_a_single_training_image_is_refused(tmp_path, capsys):
    write_images(tmp_path / "one", 1)
    assert main(["pretrain", "--dataset", "folder", "--data-dir", str(tmp_path / "one"),
                 *TINY, "--out-dir", str(tmp_path / "runs"), "--name", "one"]) == 2
    assert "needs at least 2" in capsys.readouterr().err


def test_data_that_cannot_be_read_or_held_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    for dataset in ("cifar10", "folder"):
        assert main(["pretrain", "--dataset", dataset, "--data-dir", str(tmp_path / "afile"),
                     *TINY, "--out-dir", str(tmp_path / "runs"), "--name", dataset]) == 2
        err = capsys.readouterr().err
        assert "afile" in err and "Traceback" not in err
    with pytest.raises(DataError, match="need .* GiB as uint8"):
        data._check_memory(10**7, 4096)


# --- option ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize("option,value,expect", [
    ("--seed", "-5", "--seed must be an integer in [0, 4294967295], got -5"),
    ("--seed", "1e15", "--seed must be an integer in [0, 4294967295], got 1e15"),
    ("--warmup-epochs", "1e308", "--warmup-epochs must be a number in [0, 10000], got 1e308"),
    ("--budget", "1e306h", "at most 720h, got 1e306h"),
    ("--budget", "99999h", "at most 720h, got 99999h"),
    ("--jitter-strength", "1e300", "--jitter-strength must be a number in [0, 2.5]"),
    ("--threads", "1000", "--threads must be in [0, "),
    ("--width", "100000", "--width must be an integer in [1, 1024]"),
    ("--width", "1024", "has 6,"),  # a ResNet-50 of width 1024: billions of parameters
    ("--proj-hidden", "100000", "--proj-hidden must be an integer in [1, 16384]"),
    ("--lr", "inf", "--lr must be a number in (0, 100], got inf"),
    ("--device", "cuda:zero", "--device must be auto, cpu, cuda, cuda:N or mps"),
    ("--out-dir", "a\x00b", "--out-dir must not contain a NUL character"),
    ("--out-dir", "d/" + "1" * 300, "--out-dir holds a name of 300 bytes; file systems allow"),
    ("--resume", "1" * 3000, "--resume holds a name of 3000 bytes; file systems allow"),
])
def test_run_options_out_of_range(tmp_path, capsys, option, value, expect):
    model = ["--model", "resnet50"] if value == "1024" else []
    assert main(["run", "--dataset", "digits", "--out-dir", str(tmp_path), *model,
                 f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expect", [
    (["--batch-size", "0"], "--batch-size must be an integer in [1, 65536], got 0"),
    (["--lr", "nan"], "--lr must be a number in (0, 100], got nan"),
    (["--epochs", "-1", "--min-steps", "0"], "--epochs must be an integer in [1, 100000]"),
    (["--encoder-lr-mult", "-1"], "--encoder-lr-mult must be a number in [0, 100]"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["--label-fraction", "0"], "--label-fraction must be a number in (0, 1], got 0.0"),
])
def test_finetune_options_out_of_range(run_copy, capsys, args, expect):
    before = file_tree(run_copy)
    assert main(["finetune", str(run_copy), *args]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert file_tree(run_copy) == before


@pytest.mark.parametrize("fractions", [", ,", "", "0.1,x", "0,0.5", "2"])
def test_label_efficiency_fractions_are_checked_first(run_copy, capsys, fractions):
    m = json.loads((run_copy / "metrics.json").read_text())
    m["label_efficiency"] = {"fraction": [0.5], "labels": [1]}
    (run_copy / "metrics.json").write_text(json.dumps(m))
    before = file_tree(run_copy)
    assert main(["label-efficiency", str(run_copy), "--fractions", fractions]) == 2
    err = capsys.readouterr().err
    assert "--fractions must" in err and "Traceback" not in err
    assert file_tree(run_copy) == before  # the old table stays


class _Started(Exception):
    """Raised where a command would start its real work: every check has passed."""


def _stop_at_work(monkeypatch) -> None:
    def started(*a, **k):
        raise _Started

    monkeypatch.setattr(workflow, "_load_data", started)
    monkeypatch.setattr("selfsup.inference.FeatureExtractor.embed_folder", started)
    monkeypatch.setattr("selfsup.report.write_report", started)


def _options() -> dict[str, list[tuple[str, bool]]]:
    """Every subcommand's options: (flag, takes a value)."""
    sub = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict))
    return {name: [(flag, a.nargs != 0) for a in p._actions if a.dest != "help"
                   for flag in a.option_strings]
            for name, p in sub.choices.items()}


OPTIONS = _options()
_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=10)
_VALUE = st.one_of(
    _TEXT,
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "1", "-1", "2", "1e308", "-1e308", "nan", "inf", "1e15", "0.5",
                     "99999h", "1e306h", "20m", "0s", ", ,", "../x", "/", ".", "..", "x/y",
                     "a\x00b", "cuda:9", "cpu", "small_cnn", "folder", "fail", "4096",
                     "65537", "4294967296", "1" * 5000]),
)


@st.composite
def _argv(draw, command: str, run_dir: str) -> list[str]:
    argv = [command]
    if command not in ("run", "pretrain", "compare"):
        argv.append(draw(st.one_of(st.just(run_dir), st.just(run_dir), _TEXT)))
    options = OPTIONS[command] or [("--bogus", True)]  # report has none: an unknown one
    for flag, takes_value in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv.append(f"{flag}={draw(_VALUE)}" if takes_value else flag)
    if command == "embed" and not any(a.startswith("--images") for a in argv):
        argv.append(f"--images={run_dir}")
    return argv


@pytest.mark.parametrize("command", sorted(OPTIONS))
@settings(max_examples=70, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(data=st.data())
def test_generated_options_start_or_exit_2_never_a_traceback(run, tmp_path, monkeypatch, capsys,
                                                            command, data):
    monkeypatch.chdir(tmp_path)
    _stop_at_work(monkeypatch)
    capsys.readouterr()
    argv = data.draw(_argv(command, str(run)))
    argv = [a if not a.startswith("--out-dir") else f"--out-dir={tmp_path / 'o'}" for a in argv]
    try:
        code = main(argv)
    except _Started:
        return
    except SystemExit as e:  # the parser's own refusals (unknown option, bad choice)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err[-500:])
    assert "error:" in err and "Traceback" not in err, (argv, err[-500:])


# --- files that are not what they claim --------------------------------------------------------


def _edit(path: Path, change) -> None:
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("change,expect", [
    (lambda o: o.pop("state_dict"), "weights are not a mapping"),
    (lambda o: o.__setitem__("mean", [0.5] * 5), "'mean' must be 3 finite numbers"),
    (lambda o: o.__setitem__("std", [0.5, 0.0, 0.5]), "'std' must be 3 finite numbers"),
    (lambda o: o.__setitem__("feature_dim", "64"), "feature_dim '64' does not match"),
    (lambda o: o.__setitem__("image_size", 10**9), "image_size must be an integer"),
    (lambda o: o.__setitem__("config", "x"), "config is not a mapping"),
    (lambda o: o["config"].__setitem__("width", -3), "config is invalid"),
    (lambda o: o["state_dict"].pop(next(iter(o["state_dict"]))), "missing"),
    (lambda o: o["state_dict"][next(iter(o["state_dict"]))].fill_(float("nan")),
     "non-finite weights"),
    (lambda o: o["state_dict"].update({k: v.long() for k, v in o["state_dict"].items()
                                       if v.is_floating_point()}), "wrong shape or type"),
])
def test_encoder_file_fields_are_checked(run_copy, capsys, change, expect):
    from selfsup import load_encoder

    _edit(run_copy / "encoder.pt", change)
    for cmd in ("evaluate", "finetune", "embed"):
        extra = ["--images", str(run_copy)] if cmd == "embed" else []
        assert main([cmd, str(run_copy), *extra]) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, (cmd, err)
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_encoder(run_copy)


def test_a_small_file_claiming_a_huge_network_is_refused_before_building(run_copy, monkeypatch,
                                                                         capsys):
    _edit(run_copy / "encoder.pt", lambda o: o["config"].__setitem__("width", 512))

    def no_build(*a, **k):
        raise AssertionError("a network was built before the file was checked")

    monkeypatch.setattr(checkpoint, "init_encoder", no_build)
    assert main(["evaluate", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "do not fit the configured model" in err and "wrong shape or type" in err


@pytest.mark.parametrize("change,expect", [
    (lambda o: o.pop("encoder"), "weights are not a mapping"),
    (lambda o: o.__setitem__("step", "12"), "step must be a non-negative integer"),
    (lambda o: o.__setitem__("losses", [1.0]), "loss history"),
    (lambda o: o.__setitem__("gen_states", [torch.zeros(3)]), "generator state"),
    (lambda o: o.__setitem__("head", {}), "projection head"),
    (lambda o: o.__setitem__("optimizer", {"state": 1}), "damaged"),
])
def test_checkpoint_fields_are_checked_on_resume(run_copy, capsys, change, expect):
    _edit(run_copy / "checkpoint.pt", change)
    assert main(["pretrain", "--resume", str(run_copy), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_hostile_checkpoint_is_refused_without_unsafe_advice(run_copy, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"config": {}, "x": Payload()}, run_copy / "encoder.pt")
    assert main(["evaluate", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "was refused" in err and "nothing in it was run" in err
    assert "weights_only" not in err and "trusted" not in err
    assert not Path("pwned").exists()


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"time_s": 5}', "\xff\xfe"])
def test_damaged_metrics_json_is_a_clear_error(run_copy, capsys, damage):
    (run_copy / "metrics.json").write_text(damage, encoding="latin-1")
    for cmd in (["report", str(run_copy)], ["plot", str(run_copy)],
                ["finetune", str(run_copy)], ["evaluate", str(run_copy)],
                ["pretrain", "--resume", str(run_copy), "--epochs", "2"]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert "metrics.json" in err and "selfsup evaluate" in err and "Traceback" not in err


def test_half_finished_run_says_resume_finishes_it(run_copy, capsys):
    (run_copy / "encoder.pt").unlink()
    for cmd in ("evaluate", "finetune", "embed", "plot"):
        assert main([cmd, str(run_copy), *(["--images", "x"] if cmd == "embed" else [])]) == 2
        err = capsys.readouterr().err
        assert f"selfsup run --resume {run_copy}" in err, cmd


# --- signals and file modes --------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_like_ctrl_c_and_resumes_bit_identically(tmp_path):
    base = [sys.executable, "-m", "selfsup", "pretrain", *DIGITS, "--epochs", "10",
            "--checkpoint-every", "4", "--out-dir", str(tmp_path)]
    full = subprocess.run([*base, "--name", "full"], env=CHILD_ENV, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    child = subprocess.Popen([*base, "--name", "cut"], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ckpt.exists() and child.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopping after this step and saving" in err and "Traceback" not in err
    step = checkpoint.load_checkpoint(ckpt)["step"]
    assert 0 < step < 10 * (1437 // 128)
    assert not (tmp_path / "cut" / "encoder.pt").exists()
    resumed = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--resume",
                              str(tmp_path / "cut"), "--no-progress"], env=CHILD_ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "encoder.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_take_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.save_json({"a": 1}, tmp_path / "m.json")
        files.save_npy(np.zeros(2), tmp_path / "e.npy")
        files.save_torch({"x": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == mode, p.name
