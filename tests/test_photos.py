"""A user's own photos: any size, shape and format, kept in shape, upright, read once into the
image store and mapped from there, with a budget that says before it starts what it buys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from selfsup import data, sizing, store
from selfsup.augment import AugmentParams, crop_boxes_within, crop_flip
from selfsup.config import make_config
from selfsup.errors import DataError
from tests.helpers import PHOTO_SHAPES, photo_folder, photo_pixels, write_photo


def test_crops_are_drawn_on_each_image_s_own_shape():
    """Images of many shapes at the top-left of one frame size: no crop box leaves its image,
    so the frame's padding never shows in a view; boxes cover the image's whole range."""
    shapes = torch.tensor([[64, 64], [48, 64], [64, 36], [30, 64], [64, 20]] * 40)
    g = torch.Generator().manual_seed(0)
    top, left, h, w = crop_boxes_within(shapes[:, 0], shapes[:, 1], (0.08, 1.0), (3 / 4, 4 / 3),
                                        g)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= shapes[:, 0]).all() and (left + w <= shapes[:, 1]).all()
    assert ((w / h) >= 3 / 4 - 0.05).all() and ((w / h) <= 4 / 3 + 0.05).all()
    # a 64x20 strip: no box of an allowed ratio fits at 8-100 % of its area less often than
    # not; the fallback is its centred part at the nearest ratio, inside it
    strip = (shapes[:, 1] == 20).nonzero().squeeze(1)
    assert (h[strip] <= 64).all() and (w[strip] <= 20).all()
    # frames: images black, the padding white; views never see white (boxes at least the
    # view's side, so no sample reaches half a pixel past the box)
    frames = torch.ones(len(shapes), 3, 64, 64)
    for k, (hh, ww) in enumerate(shapes.tolist()):
        frames[k, :, :hh, :ww] = 0
    p = AugmentParams(out_size=8, scale=(0.5, 1.0))
    v = crop_flip(frames, p, torch.Generator().manual_seed(1), views=2, shape=shapes)
    assert v.shape == (2 * len(shapes), 3, 8, 8) and float(v.max()) == 0.0
    # without the shapes the same frames show their padding
    assert float(crop_flip(frames, p, torch.Generator().manual_seed(1), views=2).max()) > 0.5


def test_photos_keep_their_shape_and_stand_upright(tmp_path, capsys):
    """JPEG, PNG, grey and EXIF-turned photos of five shapes: evaluation's images are the
    centred squares of the upright photos (not squashed, not lying on their side), and
    pretraining's frames hold each whole photo in its own shape."""
    root = photo_folder(tmp_path / "photos", per_class=5, classes=2, long_side=160)
    d = data.load_image_folder(root, image_size=32)
    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.frames is not None and d.frames.frames.shape == (10, 3, 64, 64)
    assert "shapes kept" in capsys.readouterr().out
    for k, f in enumerate(d.files["train"]):
        upright = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
        w, h = upright.size
        fh, fw = d.frames.shapes[k].tolist()
        assert min(fh, fw) == 32 and abs(fw / fh - w / h) < 0.05, (f, (fw, fh), (w, h))
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        want = np.asarray(upright.resize((32, 32), Image.Resampling.BILINEAR, box=box),
                          dtype=np.float32).transpose(2, 0, 1)
        got = d.train_x[k].numpy().astype(np.float32)
        assert np.abs(got - want).mean() < 6, f  # JPEGs decode at a reduced scale
        # upright: the picture's bright half is on top
        assert got[:, :12].mean() > got[:, -12:].mean() + 20, f
        # the frame holds the same picture, edge-padded to the right and below
        frame = d.frames.frames[k].numpy()
        assert (frame[:, :fh, fw:] == frame[:, :fh, fw - 1:fw]).all()
        assert (frame[:, fh:, :] == frame[:, fh - 1:fh, :]).all()


def test_decoding_for_embed_and_predict_keeps_the_shape(tmp_path):
    """``embed``'s and ``predict``'s reading (``decoded_chunks``) gives the same centred
    square as the store, a chunk at a time."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(PHOTO_SHAPES):
        write_photo(tmp_path / f"{i}.png", photo_pixels(i, w * 30, h * 30, rng),
                    turned=0)
    paths = sorted(tmp_path.glob("*.png"))
    x, kept = data.decode_images(paths, 24)
    ref = torch.stack([torch.from_numpy(data.centre_crop(Image.open(p).convert("RGB"), 24).copy())
                       for p in paths])
    assert kept == list(range(len(paths))) and torch.equal(x, ref)
    chunks = list(data.decoded_chunks(paths, 24))
    assert len(chunks) == 1 and torch.equal(chunks[0][0], x)


def test_the_store_is_reused_and_rebuilt_when_a_file_changes(tmp_path, capsys):
    root = photo_folder(tmp_path / "p", per_class=4, classes=2, long_side=100)
    first = data.load_image_folder(root, image_size=24)
    assert "decoding 8 of 8 images" in capsys.readouterr().out
    again = data.load_image_folder(root, image_size=24)
    assert "decoding" not in capsys.readouterr().out  # mapped as it was
    assert torch.equal(first.train_x, again.train_x)
    assert torch.equal(first.frames.frames, again.frames.frames)
    # one file changes (new pixels, a new time): the split is decoded again, and shows it
    changed = Path(first.files["train"][0])
    write_photo(changed, np.full((90, 120, 3), 200, np.uint8))
    os.utime(changed, ns=(1, 1))
    third = data.load_image_folder(root, image_size=24)
    assert "decoding 8 of 8 images" in capsys.readouterr().out
    assert float(third.train_x[0].float().mean()) == pytest.approx(200, abs=2)
    assert torch.equal(third.train_x[1:], first.train_x[1:])
    # another side: a store of its own beside the first
    data.load_image_folder(root, image_size=16)
    assert sorted(p.name for p in (root / ".selfsup").iterdir()) == \
        ["test-16", "test-24", "train-16", "train-24"]


def test_the_store_skips_unreadable_files_and_keeps_labels_in_step(tmp_path):
    root = photo_folder(tmp_path / "p", per_class=4, classes=3, long_side=100)
    broken = [sorted((root / "train" / c).iterdir())[i] for c, i in (("c1", 1), ("c0", 2))]
    for f in broken:
        f.write_bytes(b"not a photo")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        d = data.load_image_folder(root, image_size=24)
    assert len(d.train_x) == 10 and len(d.train_y) == 10 and len(d.frames) == 10
    assert not {str(f) for f in broken} & set(d.files["train"])
    for k, f in enumerate(d.files["train"]):  # each row is its file's picture, and label
        want = data.centre_crop(ImageOps.exif_transpose(Image.open(f)).convert("RGB"), 24)
        assert np.abs(d.train_x[k].numpy().astype(int) - want).mean() < 8
        assert d.classes[int(d.train_y[k])] == Path(f).parent.name
    # reused: the same rows, the bad files named again (found when the store was built)
    with pytest.warns(UserWarning, match="2 unreadable image file.*when the image store was"):
        again = data.load_image_folder(root, image_size=24)
    assert torch.equal(again.train_x, d.train_x) and again.files == d.files
    with pytest.raises(DataError, match="unreadable"):
        data.load_image_folder(root, image_size=24, bad_images="fail")


def test_an_interrupted_preparation_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    root = photo_folder(tmp_path / "p", per_class=10, classes=2, long_side=80)
    monkeypatch.setattr(store, "CHUNK", 4)
    calls = []
    decode = data._decode

    def stop_at_the_ninth(path, side, frame):
        calls.append(path)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return decode(path, side, frame)

    monkeypatch.setattr(data, "_decode", stop_at_the_ninth)
    with pytest.raises(KeyboardInterrupt):
        data.load_image_folder(root, image_size=16)
    index = json.loads((root / ".selfsup" / "train-16" / "index.json").read_text())
    assert index["done"] == 8 and index["count"] == 20
    monkeypatch.undo()
    monkeypatch.setattr(store, "CHUNK", 4)
    capsys.readouterr()
    resumed = data.load_image_folder(root, image_size=16)
    assert "resuming 12 of 20 images" in capsys.readouterr().out
    fresh = data.load_image_folder(tmp_path / "p", image_size=16)  # reused now
    import shutil
    shutil.rmtree(root / ".selfsup")
    rebuilt = data.load_image_folder(root, image_size=16)
    assert torch.equal(resumed.train_x, rebuilt.train_x) and torch.equal(fresh.train_x,
                                                                         rebuilt.train_x)
    assert torch.equal(resumed.frames.frames, rebuilt.frames.frames)


def test_a_read_only_data_folder_keeps_its_store_in_the_cache(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "p", per_class=3, classes=2, long_side=80)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "_writable", lambda folder: folder.is_relative_to(tmp_path /
                                                                                 "cache"))
    d = data.load_image_folder(root, image_size=16)
    assert not (root / ".selfsup").exists() and len(d.train_x) == 6
    assert len(list((tmp_path / "cache" / "selfsup" / "stores").glob("p-*/train-16"))) == 1


@pytest.mark.slow
def test_anonymous_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """A run's own memory over a folder of N and of 10 N photos, every image read once as
    pretraining and evaluation read them: the store's pages are the file cache, not the
    process's, so the 10x folder costs no more than a fixed margin."""
    rng = np.random.default_rng(0)
    for n in (100, 1000):
        for i in range(n):
            w, h = PHOTO_SHAPES[i % 5]
            write_photo(tmp_path / f"n{n}" / f"{i // 100}" / f"{i:05d}.jpg",
                        photo_pixels(i % 3, w * 40, h * 40, rng))
    script = """
import sys, torch
from selfsup import data
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
d = data.load_image_folder(sys.argv[1], image_size=96)
x = d.pretrain_images()
for i in range(0, len(x), 64):  # every image as pretraining and evaluation read them
    x[torch.arange(i, min(i + 64, len(x)))].float().sum()
    d.train_x[i:i + 64].float().sum()
print(anon())
"""
    anon = {}
    for n in (100, 1000):  # each builds its store (a chunk at a time), then reads it all
        # glibc's heap keeps up to twice its moving mmap threshold of freed blocks (a batch's
        # floats): a fixed threshold returns them, so that RssAnon is what lives
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"n{n}")],
                             check=True, capture_output=True, text=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")).stdout
        anon[n] = int(out.split()[-1])
    grown = anon[1000] - anon[100]
    # the 900 more images hold 25 MB at 96 px (and their frames 100 MB): none of it is the
    # process's own
    assert grown < 8 * 2**20, anon


def test_the_side_of_photos_comes_from_the_machine_and_the_budget(monkeypatch):
    """The cheapest rung's step at 32 px, scaled by pixels, picks the largest side that buys
    the epochs the sizing asks for; without a budget, a fixed side by device."""
    monkeypatch.setattr(sizing, "time_step", lambda *a, **k: 0.1)
    cfg = make_config("cpu", {"budget": "10m"})
    rule = sizing.photo_side(cfg, torch.device("cpu"), None)
    # 540 s of steps over 39 steps an epoch: 138 epochs at 32 px, 61 at 48, 35 at 64
    side, why = rule(600, 20_000)
    per_epoch = 20_000 // cfg.batch_size
    expect = max(s for s in sizing.PHOTO_SIDES
                 if 0.9 * 600 / (0.1 * (s / 32) ** 2 * per_epoch) >= sizing.SIDE_MIN_EPOCHS)
    assert side == expect == 48 and "35 epochs" in why
    assert rule(40, 20_000)[0] == 32  # never above the images' own side
    assert rule(600, 1_000_000)[0] == 32  # a million photos: the smallest side
    assert rule(600, 2_000)[0] == 224  # 3 steps an epoch: 37 epochs even at 224 px
    untimed = sizing.photo_side(make_config(None, {}), torch.device("cpu"), None)
    assert untimed(600, 20_000) == (64, "no --budget to fit: 64 px on cpu")


def test_a_heic_photo_is_read_or_named(tmp_path):
    pytest.importorskip("pillow_heif")
    rng = np.random.default_rng(0)
    im = Image.fromarray(photo_pixels(1, 80, 60, rng))
    data._heif_opener()
    im.save(tmp_path / "phone.heic")
    x, kept = data.decode_images([tmp_path / "phone.heic"], 16)
    assert kept == [0] and x.shape == (1, 3, 16, 16)
    assert x[0, :, :6].float().mean() > x[0, :, -6:].float().mean()


@pytest.mark.slow
def test_a_short_budget_on_photos_says_what_it_buys_before_it_starts(tmp_path):
    """``selfsup run`` on a folder of photos with a budget too short for a meaningful run:
    the warning (steps bought, the budget that buys enough) comes before the first step; the
    side the run chose is in its config, and ``selfsup embed`` reads the photos as it did.
    2 s buys about 50 steps on 2 cores (4 s bought 99-108, around the warning's 100: the test
    depended on the machine's speed)."""
    root = photo_folder(tmp_path / "photos", per_class=12, classes=2, long_side=200)
    out = subprocess.run(
        [sys.executable, "-m", "selfsup", "run", "--dataset", "folder", "--data-dir",
         str(root), "--budget", "2s", "--out-dir", str(tmp_path / "runs"), "--name", "r"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    warn = text.index("warning: a 2s budget buys")
    assert warn < text.index("step 1/") and "--budget " in text[warn:warn + 300]
    assert "after the budget, evaluation embeds 28 images" in text
    cfg = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert cfg["image_size"] in sizing.PHOTO_SIDES
    run_emb = np.load(tmp_path / "runs" / "r" / "train_emb.npy")
    subprocess.run([sys.executable, "-m", "selfsup", "embed", str(tmp_path / "runs" / "r"),
                    "--images", str(root / "train"), "--out", str(tmp_path / "e.npy")],
                   check=True, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), run_emb, rtol=1e-3, atol=1e-3)


def test_a_folder_whose_files_all_fail_to_decode_is_a_clear_error(tmp_path):
    """Headers that open, pixels that do not (truncated JPEGs): the store holds no row, and
    the error names the files."""
    rng = np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / "p" / f"{i}.jpg"
        write_photo(path, photo_pixels(i, 160, 120, rng))
        path.write_bytes(path.read_bytes()[:-2000])  # the header whole, the pixels cut
    with pytest.raises(DataError, match="none of the 3 files could be read"):
        data.load_image_folder(tmp_path / "p", image_size=16)
